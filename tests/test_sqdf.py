"""SQDF: the step and KL against the DDIM formulas, where gradient flows, the replay buffer (sampling,
checkpoints, resume), training on the tiny model, the KL's pull, the consistency-model and Tweedie paths."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from comfy_rft import lora
from comfy_rft.backend import DiffusersBackend
from comfy_rft.checkpoint import list_checkpoints
from comfy_rft.distributed import Processes
from comfy_rft.errors import UserError
from comfy_rft.loop import add_run_lora, step_gradients, train
from comfy_rft.lora import read_lora
from comfy_rft.replay import ReplayBuffer
from comfy_rft.rewards import load_reward
from comfy_rft.trainers import METHODS
from comfy_rft.trainers.sqdf import SqdfConfig, SqdfMethod

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square"]
SMALL = dict(sampling_steps=4, batch_size=2, resolution=64, lora_rank=4, lora_alpha=4.0, prompts="\n".join(PROMPTS),
             eval_samples=2, checkpoint_every=0)


def _method(tmp_path=None, **options):
    """A method with its LoRA injected and moved off zero, so the policy differs from the reference."""
    config = SqdfConfig(**{**SMALL, "out": str(tmp_path or "runs/unused"), **options})
    backend = DiffusersBackend.load("tiny-sd15", device="cpu")
    method = SqdfMethod(config, backend, load_reward("brightness"))
    method.check()
    method.params = add_run_lora(backend.denoiser, config)
    with torch.no_grad():
        for p in method.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return method


def _latents(method, seed=0):
    shape = method.backend.latent_shape(2, method.size, method.size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _lora_params(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------------------- the step


@pytest.mark.parametrize("kl_half", [False, True])
def test_step_mean_std_kl_and_tweedie_equal_the_ddim_formulas(kl_half):
    method = _method(kl_half=kl_half, eta=0.7)
    backend, c = method.backend, method.config
    k, x, noise = 1, _latents(method), _latents(method, 1)
    with torch.no_grad():
        step = method.soft_q_step(x, k, PROMPTS, noise)
        scheduler = DDIMScheduler.from_config(backend.pipe.scheduler.config)
        scheduler.set_timesteps(c.sampling_steps)
        t = int(scheduler.timesteps[k])
        t_prev = int(scheduler.timesteps[k + 1])
        cond = backend.encode(PROMPTS)
        eps = backend.predict(x, t, cond, c.guidance)
        lora.set_lora_strength(backend.denoiser, 0.0)  # the reference, switched off another way than the method's
        eps_ref = backend.predict(x, t, cond, c.guidance)
        a, a_prev = scheduler.alphas_cumprod[t].double(), scheduler.alphas_cumprod[t_prev].double()
        sigma = c.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()

        def mean(e):
            x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
            return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * e

        kl = ((mean(eps) - mean(eps_ref)) ** 2).flatten(1).mean(1) / sigma**2 * (0.5 if kl_half else 1.0)
        x_next = scheduler.step(eps, t, x, eta=c.eta, variance_noise=noise).prev_sample
        ref_next = backend.predict(x_next, t_prev, cond, c.guidance)
        tweedie = (x_next - (1 - scheduler.alphas_cumprod[t_prev]).sqrt() * ref_next) / scheduler.alphas_cumprod[
            t_prev].sqrt()
    torch.testing.assert_close(step.std.double(), sigma, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(step.mean, mean(eps).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.ref_mean, mean(eps_ref).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.kl, kl.float(), atol=1e-6, rtol=1e-4)
    assert step.kl.min() > 0
    torch.testing.assert_close(step.x_next, x_next, atol=1e-5, rtol=1e-5)  # = diffusers' DDIM(η) step
    torch.testing.assert_close(step.x0, tweedie, atol=1e-4, rtol=1e-4)


def test_the_last_step_scores_the_sample_itself():
    method = _method()
    x, noise = _latents(method), _latents(method, 1)
    with torch.no_grad():
        step = method.soft_q_step(x, method.config.sampling_steps - 1, PROMPTS, noise)
    assert torch.equal(step.x0, step.x_next)


def test_gradient_flows_only_through_the_chosen_step():
    """Hooks see the LoRA take part in exactly one denoiser call per update sample, at its step's timestep,
    with gradient; the reference and Tweedie calls run with the adapter off; x̂0 -> x' -> LoRA carries it."""
    method = _method(grad_checkpointing=False, alpha=0.5)
    backend, denoiser = method.backend, method.backend.denoiser
    method.before_step(PROMPTS, 3, Processes())  # the rollout epoch (no gradient); draws at k = 1 and 3 (last)
    calls, lora_calls = [], []
    probe = next(m for _, m in lora._lora_layers(denoiser, "default"))
    hooks = [denoiser.register_forward_pre_hook(lambda m, args: calls.append((int(args[1][0]), torch.is_grad_enabled()))),
             probe.lora_A["default"].register_forward_hook(lambda m, i, o: lora_calls.append(
                 (calls[-1][0], o.requires_grad)))]
    x_next_grads = []
    original = method.soft_q_step

    def watched(x, k, prompts, noise):
        assert not x.requires_grad  # the buffer's x_t: nothing flows into the rollout
        step = original(x, k, prompts, noise)
        assert not step.ref_mean.requires_grad and step.mean.requires_grad
        step.x_next.register_hook(lambda g: x_next_grads.append(g.abs().sum().item()))
        return step

    method.soft_q_step = watched
    try:
        output = method.loss(PROMPTS, 3)
        output.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    timesteps = backend.schedule.timesteps(method.config.sampling_steps)
    chosen = sorted({timesteps[k] for _, k in method._plan})
    assert len(chosen) == 2 and timesteps[-1] in chosen  # a Tweedie step and a last step
    assert sorted(t for t, _ in lora_calls) == chosen and all(grad for _, grad in lora_calls)
    assert len(calls) == 2 * len(chosen) + sum(t != timesteps[-1] for t in chosen)  # policy, reference, Tweedie
    assert all(p.grad is not None for p in method.params) and sum(p.grad.abs().sum() for p in method.params) > 0
    assert len(x_next_grads) == len(chosen) and all(g > 0 for g in x_next_grads)


# ---------------------------------------------------------------------------------------------- the buffer


def _buffer(rewards, steps=5, capacity=8, spill_dir=None):
    buffer = ReplayBuffer(capacity, spill_dir)
    latents = torch.randn(len(rewards), steps + 1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    buffer.add(latents, [f"prompt {i}" for i in range(len(rewards))], rewards, epoch=1)
    return buffer, latents


def test_prioritized_sampling_frequencies_match_the_probabilities():
    """P(i, k) ∝ max(r_i, 0)·γ^(T−1−k). 60,000 draws: every cell within 5 standard errors of its probability
    (a false alarm somewhere in the 20 cells has probability ~1e-5), and non-positive rewards never drawn."""
    buffer, _ = _buffer([1.0, 0.5, -1.0, 2.0])
    gamma, n = 0.8, 60_000
    probs = buffer.priorities(gamma)
    expected = torch.tensor([1.0, 0.5, 0.0, 2.0])[:, None] * gamma ** torch.arange(4, -1, -1.0)[None, :]
    torch.testing.assert_close(probs, (expected / expected.sum()).double())
    draws = buffer.sample(n, "prioritized", torch.Generator().manual_seed(0), gamma)
    counts = torch.zeros_like(probs)
    for i, k in draws:
        counts[i, k] += 1
    freq = counts / n
    tolerance = 5 * (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= tolerance).all(), (freq, probs)
    assert counts[2].sum() == 0


def test_prioritized_sampling_without_a_positive_reward_draws_trajectories_equally():
    buffer, _ = _buffer([-1.0, 0.0, -3.0])
    probs = buffer.priorities(0.5)
    torch.testing.assert_close(probs.sum(1), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(probs[0], (0.5 ** torch.arange(4, -1, -1.0) / (0.5 ** torch.arange(5.0)).sum() / 3)
                               .double())


def test_uniform_and_newest_sampling_and_fifo():
    buffer, latents = _buffer([0.1, 0.2, 0.3, 0.4, 0.5], capacity=3)
    assert len(buffer) == 3 and buffer.prompts == ["prompt 2", "prompt 3", "prompt 4"]  # the oldest left first
    assert torch.equal(buffer.latent(0, 2), latents[2, 2].half())
    uniform = buffer.sample(3, "uniform", torch.Generator().manual_seed(0))
    assert sorted(i for i, _ in uniform) == [0, 1, 2]  # without replacement while there are enough
    assert [i for i, _ in buffer.sample(4, "newest", torch.Generator().manual_seed(0))] == [2, 1, 0, 2]
    assert all(0 <= k < 5 for _, k in uniform)
    with pytest.raises(UserError, match="capacity"):
        ReplayBuffer(0)


@pytest.mark.parametrize("on_disk", [False, True], ids=["ram", "disk"])
def test_buffer_round_trips_through_a_checkpoint_file(tmp_path, on_disk):
    spill = tmp_path / "spill" if on_disk else None
    buffer, _ = _buffer([0.3, -0.2, 0.9, 0.1, 0.7], capacity=4, spill_dir=spill)
    torch.save({"method": {"buffer": buffer.state_dict()}}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)["method"]["buffer"]
    restored = ReplayBuffer(4, spill)
    restored.load_state_dict(state)
    assert (restored.prompts, restored.rewards, restored.epochs) == (buffer.prompts, buffer.rewards, buffer.epochs)
    assert all(torch.equal(restored.latent(i, k), buffer.latent(i, k)) for i in range(4) for k in range(6))
    assert restored.latent(0, 0).dtype == torch.float16
    for mode in ("uniform", "newest", "prioritized"):
        assert restored.sample(6, mode, torch.Generator().manual_seed(3), 0.9) == \
            buffer.sample(6, mode, torch.Generator().manual_seed(3), 0.9)
    if on_disk:
        assert not list(spill.iterdir())  # mapped, then unlinked: nothing left behind
    with pytest.raises(UserError, match="same buffer size"):
        ReplayBuffer(5).load_state_dict(state)


def _train(tmp_path, **options):
    config = SqdfConfig(**{**SMALL, "out": str(tmp_path), **options})
    return train(SqdfMethod, config, progress=False)


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path):
    """The buffer, the epoch counters and the last rollout rewards travel in the checkpoint: with a replay
    ratio of 3 the checkpoint of step 2 falls between an epoch's updates, and the buffer of 3 overflows."""
    options = dict(steps=4, sampling_steps=3, replay_ratio=3, buffer_sampling="prioritized", buffer_size=3,
                   lr=1e-2, checkpoint_every=2, eval_samples=2)
    whole = _train(tmp_path / "whole", **options)

    def crash_at_step_3(row):
        if row["step"] == 3:  # the checkpoint of step 2 exists; step 3's work is lost
            raise Crash

    with pytest.raises(Crash):
        train(SqdfMethod, SqdfConfig(**{**SMALL, "out": str(tmp_path / "crashed"), **options}),
              on_step=crash_at_step_3, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step-0000002.pt"]
    resumed = _train(tmp_path / "crashed", resume="latest", **options)
    a, b = read_lora(whole.lora)[0], read_lora(resumed.lora)[0]
    assert all(torch.equal(a[key], b[key]) for key in a)
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "train"] for run in ("whole", "crashed")}
    assert rows["crashed"] == [{**r, "seconds": c["seconds"], "peak_memory_mb": c["peak_memory_mb"]}
                               for r, c in zip(rows["whole"], rows["crashed"])]
    train_rows = rows["whole"]
    assert [r["buffer_size"] for r in train_rows] == [2, 2, 2, 3]  # epochs at steps 1 and 4; FIFO at 3
    assert [r["reward_mean"] for r in train_rows][:3] == [train_rows[0]["reward_mean"]] * 3  # epoch 1's reward
    assert all(k in train_rows[0] for k in ("kl", "q_estimate", "update_reward", "buffer_age"))


def test_accumulation_gives_the_update_of_the_bigger_batch():
    """Rollout noise, buffer draws and step noise are keyed by sample index: one micro-batch of 2 and two of 1
    give the same gradient (and so would two processes)."""
    grads = []
    for batch_size, accum in ((2, 1), (1, 2)):
        method = _method(batch_size=batch_size, grad_accum=accum, sampling_steps=3)
        step_gradients(method, PROMPTS, 1234, Processes())
        grads.append(torch.cat([p.grad.flatten() for p in method.params]))
    assert grads[0].abs().max() > 0
    assert ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()) < 1e-5


TWO_PROCESS_SCRIPT = textwrap.dedent(f"""
    import sys, torch
    torch.set_num_threads(1)
    from comfy_rft.backend import DiffusersBackend
    from comfy_rft.distributed import Processes
    from comfy_rft.loop import add_run_lora, step_gradients
    from comfy_rft.rewards import load_reward
    from comfy_rft.trainers.sqdf import SqdfConfig, SqdfMethod

    def gradient(batch_size, procs):
        config = SqdfConfig(**{{**{SMALL!r}, "sampling_steps": 3, "batch_size": batch_size}})
        method = SqdfMethod(config, DiffusersBackend.load("tiny-sd15", device="cpu"), load_reward("brightness"))
        method.params = add_run_lora(method.backend.denoiser, config)
        for seed in (1, 2):  # the second step's B is not zero, so every LoRA parameter gets gradient
            for p in method.params:
                p.grad = None
            step_gradients(method, ["a red circle", "a blue square"], seed, procs)
            with torch.no_grad():
                for p in method.params:
                    p.sub_(0.05 * p.grad.sign())
        latents = torch.stack([method.buffer.latent(i, 0) for i in range(len(method.buffer))])
        return torch.cat([p.grad.flatten() for p in method.params]), latents

    if __name__ == "__main__":
        procs = Processes.from_environment()
        result = gradient(1, procs)
        if procs.is_main:
            torch.save(result, sys.argv[1])
""")


@pytest.mark.slow
def test_two_processes_give_the_update_of_one_process_with_twice_the_batch(tmp_path):
    """Each process rolls out its half of the epoch; both buffers get every trajectory in sample order."""
    script = tmp_path / "sqdf_ddp.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
              str(tmp_path / "ddp.pt")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's comfy_rft, whichever one is installed
    done = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    namespace = {}
    exec(compile(TWO_PROCESS_SCRIPT, "sqdf_ddp", "exec"), namespace)
    grad, latents = namespace["gradient"](2, Processes())
    ddp_grad, ddp_latents = torch.load(tmp_path / "ddp.pt")
    assert torch.equal(ddp_latents, latents)
    assert ((ddp_grad - grad).abs().max() / grad.abs().max()) < 1e-5


# ---------------------------------------------------------------------------------------------- training


def test_a_few_epochs_raise_the_reward_and_change_every_lora_parameter(tmp_path):
    # 128 px: at 64 px the tiny UNet's mid block is 1x1 and some LoRA layers get no gradient.
    config = SqdfConfig(**{**SMALL, "out": str(tmp_path), "steps": 8, "resolution": 128, "lr": 3e-2, "alpha": 1e-4,
                           "eval_samples": 4})
    probe = DiffusersBackend.load("tiny-sd15", device="cpu")
    add_run_lora(probe.denoiser, config)
    initial = _lora_params(probe.denoiser)
    backend = DiffusersBackend.load("tiny-sd15", device="cpu")
    result = train(SqdfMethod, config, backend=backend, progress=False)
    final = _lora_params(backend.denoiser)
    assert result.reward_after > result.reward_before + 0.002, result
    assert initial.keys() == final.keys() and len(final) > 0
    unchanged = [n for n in final if torch.equal(initial[n], final[n])]
    assert not unchanged, unchanged


def _adapter_effect(backend, size, steps):
    """Relative squared distance between the LoRA'd and the reference denoiser on fixed inputs, over all steps."""
    cond = backend.encode(PROMPTS)
    x = torch.randn(backend.latent_shape(2, size, size), generator=torch.Generator().manual_seed(0))
    num = den = 0.0
    with torch.no_grad():
        for t in backend.schedule.timesteps(steps):
            policy = backend.predict(x, t, cond, 5.0)
            with lora.only_adapters(backend.denoiser, ()):
                reference = backend.predict(x, t, cond, 5.0)
            num, den = num + (policy - reference).pow(2).mean(), den + reference.pow(2).mean()
    return float(num / den)


def test_a_very_large_alpha_keeps_the_policy_at_the_reference(tmp_path):
    """The KL works: with α = 1e4 the LoRA'd denoiser stays next to the base one (its effect is under 2 % of
    the α = 0 run's; AdamW moves every weight by about lr per step either way, so weights are not the measure)."""
    effects, gains = {}, {}
    for alpha in (0.0, 1e4):
        backend = DiffusersBackend.load("tiny-sd15", device="cpu")
        result = train(SqdfMethod, SqdfConfig(**{**SMALL, "out": str(tmp_path / str(alpha)), "steps": 4,
                                                 "lr": 3e-2, "alpha": alpha}), backend=backend, progress=False)
        effects[alpha] = _adapter_effect(backend, 64, SMALL["sampling_steps"])
        gains[alpha] = result.reward_after - result.reward_before
    assert effects[0.0] > 0.05, effects
    assert effects[1e4] < 0.02 * effects[0.0], effects
    assert abs(gains[1e4]) < 0.2 * gains[0.0], gains


# ---------------------------------------------------------------------------------------------- x̂0 predictors


def _lcm_lora_file(path):
    """A tiny stand-in for an LCM-LoRA file (kohya layout, diffusers names, attention and resnet layers), random."""
    unet = DiffusersBackend.load("tiny-sd15", device="cpu").denoiser
    torch.manual_seed(11)
    params = lora.inject_lora(unet, 4, 4.0, ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1",
                                              "conv2"), adapter_name="lcm")
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    lora.save_lora(path, lora.lora_state_dict(unet, adapter_name="lcm"), None)
    return path


def _lcm_unet_folder(path, **changes):
    """A tiny stand-in for an LCM UNet folder: the tiny UNet's config with a guidance embedding, random weights."""
    config = dict(DiffusersBackend.load("tiny-sd15", device="cpu").denoiser.config)
    torch.manual_seed(12)
    UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 8, **changes}).save_pretrained(path)
    return path


def _lcm_x0(model_output, x, t, scheduler_config):
    """diffusers' LCMScheduler.step's `denoised`, as the reference for the consistency path."""
    scheduler = LCMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(50)  # its distillation grid, which holds t
    return scheduler.step(model_output, t, x, generator=torch.Generator().manual_seed(0)).denoised


@pytest.mark.parametrize("kind", ["lora", "unet"])
def test_the_consistency_model_path_runs_and_equals_lcm(tmp_path, kind):
    source = _lcm_lora_file(tmp_path / "lcm.safetensors") if kind == "lora" else _lcm_unet_folder(tmp_path / "lcm")
    method = _method(tmp_path, consistency_model=str(source))
    backend, c = method.backend, method.config
    k, x, noise = 1, _latents(method), _latents(method, 1)
    step = method.soft_q_step(x, k, PROMPTS, noise)
    t_next = backend.schedule.timesteps(c.sampling_steps)[k + 1]
    t_cm = backend.schedule.consistency_timestep(t_next)
    assert (t_next, t_cm) == (251, 259)  # the nearest timestep of LCM's 50-step grid (999, 979, ..., 259, 239, ...)
    cond = backend.encode(PROMPTS)
    with torch.no_grad():
        if kind == "lora":  # the LCM-LoRA alone on a fresh copy of the base model
            reference = DiffusersBackend.load("tiny-sd15", device="cpu")
            lora.load_lora(reference.denoiser, source)
            out = reference.predict(step.x_next, t_cm, cond, 1.0)
        else:
            unet = UNet2DConditionModel.from_pretrained(source)
            w = get_timestep_embedding(torch.zeros(2), 8, flip_sin_to_cos=False, downscale_freq_shift=1)
            out = unet(step.x_next, t_cm, encoder_hidden_states=cond.embeds, timestep_cond=w).sample
        expected = _lcm_x0(out, step.x_next, t_cm, backend.pipe.scheduler.config)
    torch.testing.assert_close(step.x0, expected, atol=1e-5, rtol=1e-4)
    step.x0.sum().backward()  # x̂0 carries gradient back to the run's LoRA through x'
    assert sum(p.grad.abs().sum() for p in method.params) > 0
    if kind == "lora":  # the LCM-LoRA is frozen and off for the policy's own calls
        assert not any(p.requires_grad for n, p in backend.denoiser.named_parameters() if "rft_consistency" in n)
        assert all(layer.active_adapters in (["default"], []) for _, layer in
                   lora._lora_layers(backend.denoiser, "rft_consistency"))


@pytest.mark.parametrize("x0_from", ["tweedie", "lcm-lora"])
def test_checkpointing_does_not_change_the_gradient(tmp_path, x0_from):
    """The adapter switches sit inside the checkpointed calls: their recomputation in backward sees the same model."""
    source = str(_lcm_lora_file(tmp_path / "lcm.safetensors")) if x0_from == "lcm-lora" else ""
    method = _method(tmp_path, consistency_model=source, alpha=0.5)
    method.before_step(PROMPTS, 3, Processes())
    grads = []
    for checkpointing in (True, False):
        method.config.grad_checkpointing = checkpointing
        for p in method.params:
            p.grad = None
        method.loss(PROMPTS, 3).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in method.params]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    assert all(p.requires_grad for p in method.params)


def test_a_training_run_with_a_consistency_lora(tmp_path):
    result = _train(tmp_path, steps=1, consistency_model=str(_lcm_lora_file(tmp_path / "lcm.safetensors")))
    keys = read_lora(result.lora)[0]
    assert result.steps == 1 and keys  # only the run's layers: the LCM-LoRA (also on resnets) never leaks in
    assert all(k.rsplit(".", 2)[0].endswith(("to_q", "to_k", "to_v", "to_out_0")) for k in keys)


# ---------------------------------------------------------------------------------------------- options


def test_the_large_preset_and_the_defaults():
    small = SqdfConfig()
    assert (small.gamma, small.alpha, small.lr, small.lora_rank, small.sampling_steps, small.eta, small.guidance,
            small.buffer_size, small.replay_ratio) == (0.9, 2.0, 1e-3, 4, 50, 1.0, 5.0, 1024, 1)
    assert not small.mask_nonpositive_rewards and not small.kl_half
    large = SqdfConfig(preset="large")
    assert (large.gamma, large.alpha) == (0.93, 0.05)
    assert SqdfConfig(preset="large", alpha=0.5).alpha == 0.5  # an explicit value wins
    assert METHODS["sqdf"] == (SqdfConfig, SqdfMethod)


def test_masking_non_positive_rewards_drops_those_samples():
    method = _method(mask_nonpositive_rewards=True, alpha=1.0)
    method.reward = lambda images, prompts: images.mean((1, 2, 3)) - torch.tensor([10.0, 0.0])  # one ≤ 0
    method.before_step(PROMPTS, 5, Processes())
    output = method.loss(PROMPTS, 5)
    assert output.metrics["masked_fraction"] == 0.5


@pytest.mark.parametrize("options, message", [
    (dict(eta=0.0), "needs --eta > 0"),
    (dict(buffer_size=1), "smaller than one optimiser step"),
    (dict(consistency_model="/nonexistent/lcm.safetensors"), "not found"),
])
def test_bad_options_give_clear_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        _train(tmp_path, steps=1, **options)


def test_a_consistency_model_for_another_model_is_refused(tmp_path):
    sdxl = DiffusersBackend.load("tiny-sdxl", device="cpu").denoiser
    lora.inject_lora(sdxl, 2, 2.0)
    lora.save_lora(tmp_path / "sdxl.safetensors", lora.lora_state_dict(sdxl), None)
    (tmp_path / "not_a_lora.safetensors").write_bytes(b"garbage")
    wrong_unet = _lcm_unet_folder(tmp_path / "wrong", cross_attention_dim=64)
    for source, message in ((tmp_path / "sdxl.safetensors", "another"), (tmp_path / "not_a_lora.safetensors",
                                                                         "not a readable"),
                            (wrong_unet, "does not fit this model"), (tmp_path, "not a diffusers UNet folder")):
        with pytest.raises(UserError, match=message):
            _method(tmp_path, consistency_model=str(source))
