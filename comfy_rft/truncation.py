"""Where reward backpropagation stops: the truncation policies of the DRaFT family.

DRaFT, DRaFT-K, DRaFT-LV, ReFL and AlignProp differ only in where the stop-gradient sits
(DRaFT's Algorithm 1). One function serves them all so that every method built on them (DRaFT,
RSA-FT around any of them) uses the same rollout. Every random choice (random K, ReFL's stop step,
LV's re-noising) comes from the step seed, so a second rollout with the same seed replays it
exactly (RSA-FT's SAM pass), and that replay may start at the returned `Boundary`, where the
gradient starts, instead of at x_T.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .backend import Cond
from .errors import UserError
from .sampler import Boundary, GradPolicy, SamplerNoise, predict, sample
from .seeding import derive_seed

BASES = ("draft-k", "draft-lv", "refl", "alignprop")


@dataclass(frozen=True)
class Truncation:
    """A reward-backprop rollout: which base and its knobs."""

    base: str = "draft-k"
    k: int = 1  # draft-k: gradient through the last K steps
    lv_samples: int = 2  # draft-lv: re-noised copies of x0 whose last step is re-run with gradient
    refl_window: int = 10  # refl: stop at a step drawn from the last `refl_window`, take x̂0 from it
    alignprop_k: tuple[int, int] = (1, 4)  # alignprop: K drawn uniformly in [a, b] per rollout

    def validate(self, num_steps: int) -> None:
        if self.base not in BASES:
            raise UserError(f"unknown base method {self.base!r}; choose one of {', '.join(BASES)}")
        if self.base == "draft-k":
            GradPolicy("last_k", k=self.k).validate(num_steps)
        if self.base == "draft-lv" and self.lv_samples < 1:
            raise UserError("DRaFT-LV needs --lv-samples >= 1 (the paper uses 2)")
        if self.base == "refl" and not 1 <= self.refl_window <= num_steps:
            raise UserError(f"--refl-window {self.refl_window} must be between 1 and the sampling steps ({num_steps})")
        if self.base == "alignprop":
            GradPolicy("random_k", k_range=self.alignprop_k).validate(num_steps)


def reward_latents(backend, cond: Cond, prompts: list[str], noise: SamplerNoise, seed: int, truncation: Truncation, *,
                   num_steps: int, eta: float, guidance: float, use_checkpoint: bool = True,
                   start: Boundary | None = None) -> tuple[torch.Tensor, list[str], Boundary]:
    """The latents to decode and score, carrying gradient where `truncation` puts it, their prompts, and the
    boundary where the gradient starts (pass it back as `start`, same seed and noise, to re-run only what follows)."""
    truncation.validate(num_steps)  # microseconds; guards callers that skipped Method.check
    rng = random.Random(seed)
    common = dict(num_steps=num_steps, eta=eta, guidance=guidance, use_checkpoint=use_checkpoint, start=start)
    if truncation.base == "draft-k":
        result = sample(backend, cond, noise, policy=GradPolicy("last_k", k=truncation.k), **common)
        return result.latents, prompts, result.boundary
    if truncation.base == "alignprop":
        policy = GradPolicy("random_k", k_range=truncation.alignprop_k)
        result = sample(backend, cond, noise, policy=policy, rng=rng, **common)
        return result.latents, prompts, result.boundary
    if truncation.base == "refl":
        stop = rng.randint(num_steps - truncation.refl_window, num_steps - 1)
        result = sample(backend, cond, noise, stop_before=stop, **common)
        x, t = result.latents, backend.schedule.timesteps(num_steps)[stop]
        out = predict(backend, x, t, cond, guidance, use_checkpoint)
        return backend.schedule.x0_and_eps(out, x, t)[0], prompts, result.boundary
    result = sample(backend, cond, noise, **common)
    latents, prompts = _lv_last_step(backend, result.latents.detach(), cond, prompts, noise.sample_seeds,
                                     truncation.lv_samples, num_steps, eta, guidance, use_checkpoint)
    return latents, prompts, result.boundary


def _lv_last_step(backend, x0, cond, prompts, sample_seeds, n, num_steps, eta, guidance, use_checkpoint):
    """DRaFT-LV: re-noise x0 to the last timestep t1 n times and re-run that step with gradient.

    Unlike a public baseline, the denoiser IS re-evaluated on each re-noised input, so the extra
    samples carry gradient (research/algorithms.md §2.4). x0 itself is not scored.
    """
    schedule = backend.schedule
    t1 = schedule.timesteps(num_steps)[-1]
    renoise, step_noise = torch.cat([  # per sample, like the rollout's own noise
        torch.randn((2, n, *x0.shape[1:]), generator=torch.Generator("cpu").manual_seed(derive_seed(s, "lv")))
        for s in sample_seeds], dim=1).to(x0)
    x1 = schedule.add_noise(x0.repeat_interleave(n, 0), renoise, t1)
    cond_n = cond.repeat_interleave(n)
    out = predict(backend, x1, t1, cond_n, guidance, use_checkpoint)
    step = schedule.step_distribution(out, x1, t1, schedule.previous(t1, num_steps), eta)
    return step.mean + step.std * step_noise, [p for p in prompts for _ in range(n)]
