"""The sampler: parity with diffusers' DDIMScheduler, gradient policies, replay, decode."""

import random

import pytest
import torch
from diffusers import DDIMScheduler

from comfy_rft.backend import DiffusersBackend
from comfy_rft.errors import UserError
from comfy_rft.sampler import GradPolicy, SamplerNoise, sample
from comfy_rft.tiny import build_tiny_pipeline


def _rollout(backend, eta, steps=6, guidance=5.0, seed=0, **kw):
    cond = backend.encode(["a red circle", "a blue square"])
    noise = SamplerNoise.from_seed(seed, backend.latent_shape(2), steps)
    return cond, sample(backend, cond, noise, num_steps=steps, eta=eta, guidance=guidance, record=True, **kw)


def _assert_matches_diffusers(backend, eta, steps=6):
    cond, result = _rollout(backend, eta, steps)
    scheduler = DDIMScheduler.from_config(backend.pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    traj = result.trajectory
    assert traj.timesteps == [int(t) for t in scheduler.timesteps]
    with torch.no_grad():
        for i, t in enumerate(traj.timesteps):
            out = backend.predict(traj.latents[i], t, cond, 5.0)
            ref = scheduler.step(out, t, traj.latents[i], eta=eta, variance_noise=traj.noises[i]).prev_sample
            torch.testing.assert_close(traj.latents[i + 1], ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(traj.means[i] + traj.stds[i] * traj.noises[i], traj.latents[i + 1])
    torch.testing.assert_close(result.latents, traj.latents[-1])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_equal_diffusers_epsilon(sd15, eta):
    _assert_matches_diffusers(sd15, eta)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_equal_diffusers_sdxl(sdxl, eta):
    _assert_matches_diffusers(sdxl, eta)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_equal_diffusers_v_prediction(tmp_path, eta):
    build_tiny_pipeline("tiny-sd15", prediction_type="v_prediction", fit=False).save_pretrained(tmp_path / "v")
    backend = DiffusersBackend.load(str(tmp_path / "v"), device="cpu")
    assert backend.schedule.prediction_type == "v_prediction"
    _assert_matches_diffusers(backend, eta)


def _steps_reached_by_gradient(backend, policy, steps=6, rng=None):
    """Indices of the steps whose denoiser output receives a gradient from the final latents."""
    for p in backend.denoiser.parameters():
        p.requires_grad_(False)
    backend.denoiser.conv_in.weight.requires_grad_(True)  # a stand-in for the adapter
    reached, carrying = set(), set()
    original = backend.predict
    calls = iter(range(steps))

    def spy(x, t, cond, guidance=1.0):
        i = next(calls)
        out = original(x, t, cond, guidance)
        if out.requires_grad:
            carrying.add(i)
            out.register_hook(lambda g, i=i: reached.add(i) if g.abs().sum() > 0 else None)
        return out

    backend.predict = spy
    cond = backend.encode(["a red circle"])
    noise = SamplerNoise.from_seed(1, backend.latent_shape(1), steps)
    result = sample(backend, cond, noise, num_steps=steps, eta=1.0, guidance=3.0, policy=policy,
                    use_checkpoint=False, rng=rng)
    result.latents.square().mean().backward()
    assert carrying == reached
    assert reached == set(result.grad_steps)
    return reached


@pytest.mark.parametrize("policy,expected", [
    (GradPolicy("none"), set()),
    (GradPolicy("all"), {0, 1, 2, 3, 4, 5}),
    (GradPolicy("last_k", k=1), {5}),
    (GradPolicy("last_k", k=3), {3, 4, 5}),
    (GradPolicy("step", step=2), {2}),
])
def test_gradient_reaches_exactly_the_policy_steps(sd15, policy, expected):
    if not expected:
        with pytest.raises(RuntimeError):  # nothing in the graph: backward has nothing to reach
            _steps_reached_by_gradient(sd15, policy)
        return
    assert _steps_reached_by_gradient(sd15, policy) == expected


def test_random_k_draws_a_suffix_within_its_range(sd15):
    rng = random.Random(0)
    seen = set()
    for _ in range(12):
        steps = GradPolicy("random_k", k_range=(2, 4)).grad_steps(6, rng)
        assert steps == set(range(6 - len(steps), 6)) and 2 <= len(steps) <= 4
        seen.add(len(steps))
    assert seen == {2, 3, 4}
    assert _steps_reached_by_gradient(sd15, GradPolicy("random_k", k_range=(2, 2)), rng=rng) == {4, 5}


def test_checkpointing_gives_the_same_gradients(sd15):
    weight = sd15.denoiser.conv_in.weight
    weight.requires_grad_(True)
    grads = []
    for use_checkpoint in (False, True):
        weight.grad = None
        _, result = _rollout(sd15, eta=1.0, steps=4, policy=GradPolicy("last_k", k=2), use_checkpoint=use_checkpoint)
        sd15.decode(result.latents, use_checkpoint=use_checkpoint).mean().backward()
        grads.append(weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", [GradPolicy("last_k", k=2), GradPolicy("random_k", k_range=(1, 5)),
                                    GradPolicy("all"), GradPolicy("none")])
def test_a_rollout_resumed_at_its_boundary_equals_the_whole_rollout(sd15, policy, monkeypatch):
    """RSA-FT's shared-prefix pass: starting where the gradient starts skips the no-gradient steps, changes nothing."""
    weight = sd15.denoiser.conv_in.weight
    weight.requires_grad_(True)
    cond = sd15.encode(["a red circle", "a blue square"])
    noise = SamplerNoise.from_seed(3, sd15.latent_shape(2), 6)
    calls = []
    predict = sd15.predict
    monkeypatch.setattr(sd15, "predict", lambda *a, **k: calls.append(1) or predict(*a, **k))
    runs = []
    for resume in (False, True):
        weight.grad, calls[:] = None, []
        result = sample(sd15, cond, noise, num_steps=6, eta=1.0, guidance=5.0, policy=policy, rng=random.Random(5),
                        start=runs[0][0].boundary if resume else None)
        forward_calls = len(calls)  # before backward recomputes the checkpointed steps
        if result.grad_steps:
            sd15.decode(result.latents).mean().backward()
        runs.append((result, forward_calls, weight.grad))
    (whole, whole_calls, whole_grad), (resumed, resumed_calls, resumed_grad) = runs
    assert whole.boundary.index == min(whole.grad_steps, default=6) and whole_calls == 6
    assert resumed_calls == 6 - whole.boundary.index
    assert torch.equal(whole.latents, resumed.latents)
    assert (whole_grad is None) == (resumed_grad is None) == (policy.mode == "none")
    if whole_grad is not None:
        assert whole_grad.abs().sum() > 0 and torch.equal(whole_grad, resumed_grad)
    with pytest.raises(ValueError, match="gradient starts at step"):
        sample(sd15, cond, noise, num_steps=6, policy=GradPolicy("last_k", k=1),
               start=type(whole.boundary)(2, whole.boundary.latent))


def test_noise_replay_is_exact_and_seeds_differ(sd15):
    _, a = _rollout(sd15, eta=1.0, seed=7)
    _, b = _rollout(sd15, eta=1.0, seed=7)
    _, c = _rollout(sd15, eta=1.0, seed=8)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)


def test_decode_is_differentiable_and_in_unit_range(sd15):
    latents = torch.randn(sd15.latent_shape(2), requires_grad=True)
    images = sd15.decode(latents)
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_prompt_embeddings_are_cached(sd15, monkeypatch):
    sd15.encode(["a red circle", "a blue square"])
    calls = []
    monkeypatch.setattr(sd15, "_encode_uncached", lambda prompts: calls.append(prompts))
    cond = sd15.encode(["a blue square", "a red circle", "a red circle"])
    assert calls == [] and cond.embeds.shape[0] == 3
    torch.testing.assert_close(cond.embeds[1], cond.embeds[2])


def test_k_larger_than_the_steps_is_refused():
    with pytest.raises(UserError, match="K=7 .*6"):
        GradPolicy("last_k", k=7).grad_steps(6)
