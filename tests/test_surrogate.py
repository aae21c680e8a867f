"""LaSRO's surrogate reward: the Bradley–Terry loss and pairwise accuracy by hand, the encoder copy against the
UNet's own activations, no LoRA leak, gradients to latents, and the safetensors file (bit-exact, clear errors)."""

import math

import pytest
import torch

from comfy_rft import lora
from comfy_rft.errors import UserError
from comfy_rft.rewards.surrogate import Surrogate, bradley_terry_loss, load_surrogate, pair_accuracy


def _surrogate(backend, seed=0, **options):
    torch.manual_seed(seed)
    return Surrogate(backend.unet_encoder(options.pop("depth", -1)), lambda prompts, z: backend.encode(prompts),
                     timestep=50, alpha_bar=backend.schedule.alpha_bar(50), base_model=backend.name, **options)


def _latents(n=3, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red circle", "a blue square", "a red circle"]


def test_bradley_terry_loss_equals_a_hand_computation():
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0])
    rewards = torch.tensor([1.0, 2.0, 0.5, 7.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    # Group 0 ranks 1 > 0 > 2; group 1 is a tie (no pair); pairs across groups never count.
    pairs = [(1, 0), (1, 2), (0, 2)]  # (winner, loser)
    expected = sum(-math.log(1 / (1 + math.exp(-(scores[w] - scores[l]).item()))) for w, l in pairs) / len(pairs)
    got = bradley_terry_loss(scores, rewards, groups)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # The accuracy over the same pairs: 1 > 0 is wrong (-1.0 < 0.5), 1 > 2 wrong, 0 > 2 wrong.
    assert pair_accuracy(scores, rewards, groups) == pytest.approx(0.0)
    assert pair_accuracy(-scores, rewards, groups) == pytest.approx(1.0)
    assert pair_accuracy(torch.zeros(5), rewards, groups) == pytest.approx(0.5)  # ties count half
    no_pairs = torch.tensor([0, 1, 2, 3, 4])
    assert bradley_terry_loss(scores, rewards, no_pairs).item() == 0.0 and math.isnan(pair_accuracy(scores, rewards,
                                                                                                    no_pairs))


def _unet_features(backend, x, t, cond):
    """The UNet's own conv_in, down block and mid block outputs, caught with hooks during its forward."""
    unet, caught = backend.denoiser, []
    modules = [unet.conv_in, *unet.down_blocks, unet.mid_block]
    handles = [m.register_forward_hook(lambda m, i, o: caught.append(o[0] if isinstance(o, tuple) else o))
               for m in modules]
    try:
        added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        unet(x, torch.full((len(x),), t), encoder_hidden_states=cond.embeds, added_cond_kwargs=added)
    finally:
        for h in handles:
            h.remove()
    return caught


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_the_encoder_computes_what_the_unet_computes(model, request):
    backend = request.getfixturevalue(model)
    encoder = backend.unet_encoder()
    x, cond = _latents(2), backend.encode(PROMPTS[:2])
    with torch.no_grad():
        ours, theirs = encoder(x, 50, cond), _unet_features(backend, x, 50, cond)
    assert len(ours) == len(theirs) == len(encoder.feature_channels)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    shallow = backend.unet_encoder(depth=1)
    assert len(shallow.feature_channels) == 2 and len(shallow.levels) == 1  # only what is read is copied
    with pytest.raises(UserError, match="levels after conv_in"):
        backend.unet_encoder(depth=99)


def test_the_generators_lora_never_leaks_into_the_surrogate(sd15):
    surrogate = _surrogate(sd15)
    x = _latents()
    before = surrogate(x, PROMPTS).detach()
    params = lora.inject_lora(sd15.denoiser, 4, 4.0)  # the run's LoRA, made non-zero
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert torch.equal(surrogate(x, PROMPTS).detach(), before)
    after_injection = _surrogate(sd15)  # built from the LoRA'd UNet: the copy drops the adapter
    assert not any("lora" in n for n, _ in after_injection.named_parameters())
    assert torch.equal(after_injection(x, PROMPTS).detach(), before)


def test_gradient_reaches_the_latents_and_only_the_trainable_parts_train(sd15):
    surrogate = _surrogate(sd15, tune="head+last")
    x = _latents().requires_grad_(True)
    surrogate(x, PROMPTS).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    trainable = {n for n, p in surrogate.named_parameters() if p.requires_grad}
    mid = f"encoder.levels.{len(surrogate.encoder.levels) - 1}."  # the mid block, the deepest level
    assert trainable and all(n.startswith(("head.", mid)) for n in trainable)
    assert any(n.startswith(mid) for n in trainable)
    assert not any(p.requires_grad for p in sd15.denoiser.parameters())


def test_save_and_load_round_trip_bit_exact(sd15, tmp_path):
    surrogate = _surrogate(sd15, seed=1, tune="head+last", width=16)
    with torch.no_grad():  # move the tuned block away from the base model's weights too
        for p in surrogate.trainable_parameters():
            p.add_(0.01)
    path = surrogate.save(tmp_path / "s.safetensors")
    fresh = _surrogate(sd15, seed=2, tune="head+last", width=16)
    x = _latents()
    assert not torch.equal(fresh(x, PROMPTS), surrogate(x, PROMPTS))
    load_surrogate(path, fresh)
    assert torch.equal(fresh(x, PROMPTS), surrogate(x, PROMPTS))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), surrogate.state_dict().values()))


def test_loading_a_wrong_file_is_a_clear_error(sd15, sdxl, tmp_path):
    path = _surrogate(sd15, width=16).save(tmp_path / "s.safetensors")
    with pytest.raises(UserError, match="other surrogate options.*width"):
        load_surrogate(path, _surrogate(sd15, width=8))
    with pytest.raises(UserError, match="surrogate for another model"):
        load_surrogate(path, _surrogate(sdxl, width=16))
    lora_file = lora.save_lora(tmp_path / "l.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, {})
    with pytest.raises(UserError, match="not a LaSRO surrogate file"):
        load_surrogate(lora_file, _surrogate(sd15))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_surrogate(tmp_path / "junk.safetensors", _surrogate(sd15))
    with pytest.raises(UserError, match="not found"):
        load_surrogate(tmp_path / "missing.safetensors", _surrogate(sd15))
