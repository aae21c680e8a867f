"""LaSRO: the few-step sampler against diffusers' LCMScheduler, the CLI raising a non-differentiable reward (JPEG
size) in both directions with a held-out pairwise accuracy clearly above chance, the frozen-surrogate ablation,
exact resume, the base regulariser, and clear errors."""

import json

import pytest
import torch
from diffusers import LCMScheduler

from comfy_rft import lora
from comfy_rft.cli import main
from comfy_rft.errors import UserError
from comfy_rft.loop import add_run_lora, train
from comfy_rft.rewards import load_reward
from comfy_rft.rewards.base import LatentReward
from comfy_rft.rewards.surrogate import read_surrogate
from comfy_rft.sampler import SamplerNoise, few_step_sample
from comfy_rft.trainers import METHODS
from comfy_rft.trainers.lasro import LasroConfig, LasroMethod

PROMPTS = "a red circle\na blue square"
SMALL = dict(prompts=PROMPTS, batch_size=2, lora_rank=4, lora_alpha=4.0, lr=1e-2, eval_samples=4, checkpoint_every=0)


def _method(backend, reward="brightness", with_lora=True, **options):
    config = LasroConfig(**{**SMALL, **options})
    method = LasroMethod(config, backend, load_reward(reward))
    method.check()
    if with_lora:
        method.params = add_run_lora(backend.denoiser, config)
    return method


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_method_is_registered_and_takes_non_differentiable_rewards():
    assert METHODS["lasro"] == (LasroConfig, LasroMethod)
    assert not LasroMethod.needs_differentiable_reward


@pytest.mark.parametrize("timesteps", [[999], [999, 499], [800, 300]])
def test_few_step_sampling_matches_diffusers_lcm_scheduler(sd15, timesteps):
    cond = sd15.encode(["a red circle", "a blue square"])
    shape = sd15.latent_shape(2)
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    noise = SamplerNoise(initial=x_t, steps=[torch.randn(shape, generator=torch.Generator().manual_seed(7))])
    with torch.no_grad():
        ours = few_step_sample(sd15, cond, noise, timesteps)
        scheduler = LCMScheduler.from_config(sd15.pipe.scheduler.config)
        scheduler.set_timesteps(timesteps=timesteps)
        x, generator = x_t, torch.Generator().manual_seed(7)  # the scheduler draws its re-noising noise from it
        for t in scheduler.timesteps:
            x = scheduler.step(sd15.predict(x, int(t), cond), t, x, generator=generator).prev_sample
    assert len(ours.x0s) == len(timesteps) and ours.timesteps == timesteps
    # LCM's boundary scalings c_skip ≈ 1e-9, c_out ≈ 1 - 1e-9 at these timesteps: the same x̂0 up to rounding.
    torch.testing.assert_close(ours.x0s[-1], x, atol=1e-4, rtol=1e-5)


def test_deterministic_renoising_and_gradient_through_both_steps(sd15):
    method = _method(sd15, eta=0.0)
    with torch.no_grad():
        for p in method.params:  # a non-zero adapter so both steps' denoiser calls carry gradient
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    noise = method.noise(2, 5)
    _, result = method.rollout(["a", "b"], noise)
    with torch.no_grad():
        out = sd15.predict(result.inputs[0], 999, sd15.encode(["a", "b"]), 1.0)
        x0, eps = sd15.schedule.x0_and_eps(out, result.inputs[0], 999)
    torch.testing.assert_close(result.inputs[1], sd15.schedule.add_noise(x0, eps, 499))  # η=0: ε̂ reused
    z1_grad = torch.autograd.grad(result.x0s[1].sum(), result.x0s[0], retain_graph=True)[0]
    assert z1_grad.abs().sum() > 0  # the 2-step output depends on the 1-step output through the re-noising
    grads = torch.autograd.grad(result.x0s[1].sum(), method.params, allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_cli_raises_the_jpeg_reward_and_writes_the_surrogate(tmp_path, capsys):
    """The issue's acceptance command: a non-differentiable reward, 30 steps, the true reward rises."""
    args = ["train", "--method", "lasro", "--model", "tiny-sd15", "--reward", "jpeg", "--steps", "30",
            "--out", str(tmp_path), "--prompts", PROMPTS, "--lr", "1e-2", "--surrogate-depth", "0",
            "--eval-samples", "8", "--checkpoint-every", "0"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "lasro" and summary["reward_after"] > summary["reward_before"] + 0.05, summary
    rows = [r for r in _rows(tmp_path) if r["kind"] == "train"]
    assert len(rows) == 30
    for key in ("true_reward", "true_reward_one_step", "surrogate_reward", "surrogate_pair_accuracy",
                "reward_queries", "surrogate_loss", "surrogate_gap"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert all(r["reward_mean"] == pytest.approx(r["true_reward"]) for r in rows)  # the loop logs the true reward
    # The hacking detector: each round's accuracy is measured on fresh samples before the surrogate trains on them.
    # JPEG size is learnable from the encoder's shallowest level (one round alone is noisy: average ten).
    recent = [r["surrogate_pair_accuracy"] for r in rows[-10:]]
    assert sum(recent) / len(recent) > 0.6, recent
    # 4 stage-1 rounds + one per step, each 2 prompts x 4 noises x 2 outputs; plus 2 x 2 generator samples per step
    assert rows[-1]["reward_queries"] == (4 + 30) * 16 + 30 * 4
    tensors, metadata = read_surrogate(tmp_path / "lasro_jpeg_surrogate.safetensors")
    assert metadata["comfy_rft.reward"] == "jpeg" and all(k.startswith("head.") for k in tensors)


def test_the_surrogate_follows_the_reward_not_a_drift(tmp_path):
    """JPEG incompressibility is the opposite of the reward above. The tiny model drifts toward compressible
    images under almost any update, so raising this one needs a surrogate that learned the ranking: trained, it
    rose in 5 of 5 seeds (+0.05..+0.09 kB); left at its random init (the control), it moves at random."""
    options = {**SMALL, "reward": "jpeg-incompressibility", "steps": 30, "surrogate_depth": 0, "eval_samples": 8}
    learned = train(LasroMethod, LasroConfig(out=str(tmp_path / "learned"), **options), progress=False)
    control = train(LasroMethod, LasroConfig(out=str(tmp_path / "control"), surrogate_steps=0, surrogate_warmup=0,
                                             **options), progress=False)
    gain, control_gain = (r.reward_after - r.reward_before for r in (learned, control))
    assert gain > 0.02 and gain > control_gain + 0.02, (gain, control_gain)


def test_frozen_surrogate_stops_learning_and_reports_its_gap(sd15):
    method = _method(sd15, reward="jpeg", freeze_surrogate_after=2, surrogate_depth=0, surrogate_warmup=1)
    snapshots, metrics = [], []
    for step in range(5):
        snapshots.append({k: v.clone() for k, v in method.surrogate.trainable_state().items()})
        output = method.loss(["a red circle", "a blue square"], seed=step)
        output.loss.backward()
        metrics.append(output.metrics)
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [True, True, False, False]  # trained in steps 1-2, frozen from step 3 on
    assert all(p.grad is None for p in method.surrogate.parameters())  # the generator's loss never reaches ψ
    for m in metrics:
        assert {"surrogate_gap", "surrogate_pair_accuracy", "true_reward", "surrogate_reward"} <= m.keys()
        assert m["surrogate_gap"] == m["surrogate_gap"]  # finite
    assert metrics[-1]["reward_queries"] > metrics[2]["reward_queries"]  # fresh samples still scored when frozen


def test_resume_equals_the_uninterrupted_run(tmp_path):
    options = dict(SMALL, reward="jpeg", steps=4, surrogate_depth=0, surrogate_warmup=1, eval_samples=2,
                   checkpoint_every=2, buffer_size=40)
    whole = train(LasroMethod, LasroConfig(out=str(tmp_path / "whole"), **options), progress=False)

    def crash_after_step_3(row):
        if row["step"] == 3:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train(LasroMethod, LasroConfig(out=str(tmp_path / "crashed"), **options), on_step=crash_after_step_3,
              progress=False)
    resumed = train(LasroMethod, LasroConfig(out=str(tmp_path / "crashed"), resume="latest", **options),
                    progress=False)
    a, b = lora.read_lora(whole.lora)[0], lora.read_lora(resumed.lora)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    s_whole = read_surrogate(tmp_path / "whole" / "lasro_jpeg_surrogate.safetensors")[0]
    s_resumed = read_surrogate(tmp_path / "crashed" / "lasro_jpeg_surrogate.safetensors")[0]
    for key in s_whole:
        torch.testing.assert_close(s_whole[key], s_resumed[key], atol=1e-6, rtol=0)
    queries = [[r["reward_queries"] for r in _rows(tmp_path / run) if r["kind"] == "train"]
               for run in ("whole", "crashed")]
    assert queries[0] == queries[1]  # the counter resumes too


def test_surrogate_init_starts_from_a_saved_surrogate(sd15, tmp_path):
    first = _method(sd15, surrogate_depth=0)
    with torch.no_grad():
        for p in first.surrogate_params:
            p.add_(0.5)
    path = first.save_artifacts(tmp_path, "run")[0]
    assert path.name == "run_surrogate.safetensors"
    second = _method(sd15, with_lora=False, surrogate_depth=0, surrogate_init=str(path))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(second.surrogate(x, ["a", "b"]), first.surrogate(x, ["a", "b"]))
    with pytest.raises(UserError, match="other surrogate options"):
        _method(sd15, with_lora=False, surrogate_depth=1, surrogate_init=str(path))


def test_base_regularizer_targets_the_base_models_prediction(sd15, sdxl):
    method = _method(sd15, base_regularizer=1.0)
    with torch.no_grad():
        for p in method.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, cond = torch.randn(2, 4, 8, 8), sd15.encode(["a", "b"])
    flags = [p.requires_grad for p in method.params]
    base = method.base_x0(x, 999, cond)
    assert [p.requires_grad for p in method.params] == flags  # the adapter is back on, still trainable
    lora.set_lora_strength(sd15.denoiser, 0.0)
    with torch.no_grad():
        reference = sd15.schedule.x0_and_eps(sd15.predict(x, 999, cond), x, 999)[0]
    lora.set_lora_strength(sd15.denoiser, 1.0)
    torch.testing.assert_close(base, reference)
    with torch.no_grad():
        tuned = sd15.schedule.x0_and_eps(sd15.predict(x, 999, cond), x, 999)[0]
    assert not torch.allclose(tuned, base, atol=1e-4)
    output = method.loss(["a", "b"], seed=0)
    assert output.metrics["base_regularizer"] > 0


def test_sdxl_trains(tmp_path, sdxl):
    config = LasroConfig(**{**SMALL, "model": "tiny-sdxl", "steps": 2, "surrogate_warmup": 1, "eval_samples": 2,
                            "out": str(tmp_path), "reward": "jpeg"})
    result = train(LasroMethod, config, backend=sdxl, progress=False)
    assert result.steps == 2 and (tmp_path / "lasro_jpeg_surrogate.safetensors").exists()


@pytest.mark.parametrize("options,message", [
    (dict(timesteps="999,499,100"), "1- or 2-step generators"),
    (dict(timesteps="999"), "pass --sampling-steps 1 too"),
    (dict(timesteps="499,999"), "noisiest first"),
    (dict(timesteps="1000,10"), r"in \[0, 999\]"),
    (dict(timesteps="nine"), "integers separated by commas"),
    (dict(one_step_weight=0.0, sampling_steps=1), "weight is 0"),
    (dict(buffer_size=8), "cannot hold one surrogate round"),
    (dict(surrogate_timestep=1000), "below the model's 1000 training timesteps"),
    (dict(surrogate_depth=9), "levels after conv_in"),
])
def test_bad_options_are_clear_errors(sd15, options, message):
    with pytest.raises(UserError, match=message):
        _method(sd15, **options)


def test_cli_bad_timesteps_exit_2_with_the_fix(tmp_path, capsys):
    code = main(["train", "--method", "lasro", "--reward", "jpeg", "--steps", "1", "--out", str(tmp_path),
                 "--timesteps", "999"])
    err = capsys.readouterr().err
    assert code == 2 and "--sampling-steps 1" in err and "Traceback" not in err


def test_surrogate_is_a_differentiable_latent_reward(sd15):
    method = _method(sd15)
    assert isinstance(method.surrogate, LatentReward) and method.surrogate.differentiable
