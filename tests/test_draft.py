"""DRaFT trains: the reward rises, every LoRA parameter moves, runs are reproducible, files load in diffusers."""

import pytest
import torch
from lora_checks import assert_no_key_problems, captured_messages
from peft.tuners.lora import LoraLayer

from comfy_rft.backend import DiffusersBackend
from comfy_rft.loop import add_run_lora, train
from comfy_rft.lora import read_lora
from comfy_rft.tiny import tiny_model_dir
from comfy_rft.trainers.draft import DraftConfig, DraftMethod

FAST = dict(sampling_steps=4, guidance=3.0, batch_size=2, eval_samples=4, lr=3e-2, lora_rank=4, lora_alpha=4.0,
            prompts="a red circle\na blue square")


def _lora_params(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def _train(tmp_path, backend, **options):
    config = DraftConfig(out=str(tmp_path), **{**FAST, **options})
    initial = _lora_params_after_injection(backend, config)
    result = train(DraftMethod, config, backend=backend, progress=False)
    return result, initial, _lora_params(backend.denoiser)


def _lora_params_after_injection(backend, config):
    """The adapter's initial values: the loop seeds its init, so injecting into a fresh copy reproduces them."""
    probe = DiffusersBackend.load(config.model, device="cpu")
    add_run_lora(probe.denoiser, config)
    return _lora_params(probe.denoiser)


@pytest.mark.parametrize("options", [dict(k=1), dict(lv_samples=2)], ids=["draft-k1", "draft-lv2"])
def test_draft_raises_the_reward_and_changes_every_lora_parameter(tmp_path, sd15, options):
    # 128 px: at 64 px the mid block is 1x1, where self-attention's q and k provably get no gradient.
    result, initial, final = _train(tmp_path, sd15, steps=10, resolution=128, **options)
    assert result.reward_after > result.reward_before + 0.002, result
    assert initial.keys() == final.keys() and len(final) > 0
    unchanged = [n for n in final if torch.equal(initial[n], final[n])]
    assert not unchanged, unchanged


def test_full_draft_on_sdxl_trains(tmp_path, sdxl):
    result, _, _ = _train(tmp_path, sdxl, steps=3, k=4, model="tiny-sdxl")
    assert result.steps == 3 and result.reward_after != result.reward_before


def test_same_seed_gives_the_same_lora_bit_for_bit(tmp_path):
    files = []
    for run in ("a", "b"):
        backend = DiffusersBackend.load("tiny-sd15", device="cpu")
        result, _, _ = _train(tmp_path / run, backend, steps=2, k=2)
        files.append(read_lora(result.lora)[0])
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_trained_lora_file_loads_in_diffusers_and_reproduces_the_model(tmp_path, model):
    from diffusers import DiffusionPipeline

    backend = DiffusersBackend.load(model, device="cpu")
    result, _, _ = _train(tmp_path, backend, steps=2, model=model)
    tensors, metadata = read_lora(result.lora)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert metadata["comfy_rft.method"] == "draft" and metadata["comfy_rft.reward"] == "brightness"
    pipe = DiffusionPipeline.from_pretrained(tiny_model_dir(model), local_files_only=True)
    with captured_messages() as messages:
        pipe.load_lora_weights(result.lora)
    assert_no_key_problems(messages)
    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == sum(
        isinstance(m, LoraLayer) for m in backend.denoiser.modules())
    cond = backend.encode(["a red circle"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = backend.predict(x, 500, cond)
        backend.denoiser = pipe.unet  # the same conditioning, through diffusers' LoRA-loaded UNet
        theirs = backend.predict(x, 500, cond)
    assert not torch.allclose(ours, _base_output(model, x, cond), atol=1e-4)  # the LoRA does something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def _base_output(model, x, cond):
    with torch.no_grad():
        return DiffusersBackend.load(model, device="cpu").predict(x, 500, cond)
