"""One differentiable DDIM(η) sampling loop for every method.

A `GradPolicy` names the steps whose denoiser call carries gradient to the trainable adapter
(DRaFT-K: the last K; AlignProp: a random K; ReFL/SQDF: one chosen step). Steps before the first
gradient step run without autograd; after it, the latent chain keeps its graph so the gradient
reaches x0. Each gradient step is checkpointed (recomputed in backward) so memory does not grow
with the number of steps. `SamplerNoise` fixes every random draw of a rollout up front, so a
rollout can be replayed exactly (RSA-FT's second pass, resume), and a `Boundary` lets a replay start
where the gradient starts, without running the no-gradient steps again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from .backend import Cond
from .errors import UserError
from .lora import only_adapters
from .seeding import derive_seed

POLICY_MODES = ("none", "all", "last_k", "random_k", "step")


@dataclass(frozen=True)
class GradPolicy:
    """Which sampling steps (0 = noisiest) carry gradient into the adapter."""

    mode: str = "last_k"
    k: int = 1  # last_k
    k_range: tuple[int, int] = (1, 1)  # random_k: K drawn uniformly in [a, b] per rollout
    step: int = -1  # step: this index only (negative counts from the end)

    def validate(self, num_steps: int) -> None:
        if self.mode not in POLICY_MODES:
            raise UserError(f"unknown gradient policy {self.mode!r}; choose one of {', '.join(POLICY_MODES)}")
        if self.mode == "last_k" and self.k > num_steps:
            raise UserError(f"K={self.k} is larger than the number of sampling steps ({num_steps}): lower --k or "
                            f"raise --sampling-steps (K equal to the steps is full DRaFT)")
        if self.mode == "last_k" and self.k < 1:
            raise UserError(f"K={self.k} must be at least 1 (the last K sampling steps carry gradient)")
        if self.mode == "random_k":
            a, b = self.k_range
            if not 1 <= a <= b <= num_steps:
                raise UserError(f"random K range [{a}, {b}] must satisfy 1 <= a <= b <= sampling steps ({num_steps})")
        if self.mode == "step" and not -num_steps <= self.step < num_steps:
            raise UserError(f"gradient step {self.step} is outside the {num_steps} sampling steps")

    def grad_steps(self, num_steps: int, rng: random.Random | None = None) -> frozenset[int]:
        """The indices of the steps whose denoiser call is differentiable, for one rollout."""
        self.validate(num_steps)
        if self.mode == "none":
            return frozenset()
        if self.mode == "all":
            return frozenset(range(num_steps))
        if self.mode == "step":
            return frozenset({self.step % num_steps})
        k = self.k if self.mode == "last_k" else (rng or random).randint(*self.k_range)
        return frozenset(range(num_steps - k, num_steps))


@dataclass
class SamplerNoise:
    """The initial latent and every per-step noise of one rollout.

    Each sample's noise comes from its own seed, so a sample draws the same noise whether it is
    rendered in a batch of 4, in two micro-batches of 2, or on one of two processes.
    """

    initial: torch.Tensor
    steps: list[torch.Tensor]
    sample_seeds: tuple[int, ...] = ()

    @classmethod
    def from_seed(cls, seed: int, shape: tuple[int, ...], num_steps: int, device="cpu", dtype=torch.float32,
                  first_index: int = 0):
        """Noise for samples first_index .. first_index + shape[0] - 1 of the rollout keyed by `seed`."""
        seeds = tuple(derive_seed(seed, "sample", first_index + i) for i in range(shape[0]))
        draws = torch.stack([torch.randn((num_steps + 1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(s))
                             for s in seeds], dim=1)
        draws = draws.to(device=device, dtype=dtype)
        return cls(initial=draws[0], steps=list(draws[1:]), sample_seeds=seeds)


@dataclass
class Trajectory:
    """What a rollout went through, detached: latents x_T..x_0, timesteps, noises, step means/stds."""

    latents: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    noises: list[torch.Tensor] = field(default_factory=list)
    means: list[torch.Tensor] = field(default_factory=list)
    stds: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Boundary:
    """The detached latent entering step `index`, the first step with gradient (or the end of the steps run).

    Everything before it ran without autograd, so it depends on the adapter only as a constant: a
    replay with the same noise and policy draws can start here (RSA-FT's shared-prefix SAM pass).
    """

    index: int
    latent: torch.Tensor


@dataclass
class SampleResult:
    latents: torch.Tensor
    grad_steps: frozenset[int]
    boundary: Boundary
    trajectory: Trajectory | None = None


def predict(backend, x: torch.Tensor, t: int, cond: Cond, guidance: float, use_checkpoint: bool = True,
            adapters: tuple[str, ...] | None = None) -> torch.Tensor:
    """The denoiser's output at x_t, recomputed in backward when checkpointed (and gradient is on).

    `adapters` runs it with only those LoRA adapters on (`()`: the base model, e.g. a reference or
    Tweedie prediction that carries gradient to x but not to the LoRA); None leaves them as they are.
    The switch happens inside the checkpointed function, so the recomputation sees the same model.
    """
    def model_output(x_in):
        if adapters is None:
            return backend.predict(x_in, t, cond, guidance)
        with only_adapters(backend.denoiser, adapters):
            return backend.predict(x_in, t, cond, guidance)

    return checkpointed(model_output, x, use_checkpoint)


def checkpointed(fn, x: torch.Tensor, use_checkpoint: bool = True) -> torch.Tensor:
    """fn(x), recomputed in backward instead of kept when `use_checkpoint` (and gradient is on)."""
    return checkpoint(fn, x, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else fn(x)


def sample(backend, cond: Cond, noise: SamplerNoise, *, num_steps: int, eta: float = 0.0, guidance: float = 7.5,
           policy: GradPolicy = GradPolicy("none"), rng: random.Random | None = None,
           use_checkpoint: bool = True, record: bool = False, stop_before: int | None = None,
           start: Boundary | None = None) -> SampleResult:
    """Run DDIM(η) from noise.initial to x0; gradient flows through the steps `policy` names.

    `stop_before=i` returns the latent that enters step i instead (ReFL takes x̂0 from there).
    `start` resumes from the boundary an earlier rollout with the same noise, policy and rng state
    returned, skipping the steps before it; the result is what the full rollout gives with the
    adapter those steps ran under.
    """
    schedule = backend.schedule
    timesteps = schedule.timesteps(num_steps)[:stop_before]
    grad_steps = policy.grad_steps(num_steps, rng)
    first_grad = min(grad_steps, default=num_steps)
    boundary_index = min(first_grad, len(timesteps))
    if start is not None and (start.index != boundary_index or record):
        raise ValueError(f"cannot resume at step {start.index}: this rollout's gradient starts at step "
                         f"{boundary_index}" + (" (and a resumed rollout records no trajectory)" if record else ""))
    boundary = start
    trajectory = Trajectory() if record else None
    x = noise.initial if start is None else start.latent
    if record:
        trajectory.latents.append(x.detach())

    for i in range(0 if start is None else boundary_index, len(timesteps)):
        t = timesteps[i]
        if i == boundary_index:
            boundary = Boundary(i, x.detach())
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_grad):
            if i in grad_steps and torch.is_grad_enabled():
                out = predict(backend, x, t, cond, guidance, use_checkpoint)
            else:
                with torch.no_grad():
                    out = backend.predict(x, t, cond, guidance)
            step = schedule.step_distribution(out, x, t, schedule.previous(t, num_steps), eta)
            x = step.mean + step.std * noise.steps[i]
        if record:
            trajectory.timesteps.append(t)
            trajectory.noises.append(noise.steps[i])
            trajectory.means.append(step.mean.detach())
            trajectory.stds.append(step.std.detach())
            trajectory.latents.append(x.detach())
    boundary = boundary or Boundary(len(timesteps), x.detach())
    return SampleResult(latents=x, grad_steps=grad_steps, boundary=boundary, trajectory=trajectory)


@dataclass
class FewStepResult:
    """A consistency-style rollout: the x̂0 of every step (x0s[-1] is the sample) and each step's input x_t."""

    x0s: list[torch.Tensor]
    inputs: list[torch.Tensor]
    timesteps: list[int]


def few_step_sample(backend, cond: Cond, noise: SamplerNoise, timesteps: list[int], *, guidance: float = 1.0,
                    renoise_eta: float = 1.0, use_checkpoint: bool = True) -> FewStepResult:
    """LCM/Turbo-style multistep sampling: predict x̂0 at each timestep, re-noise it to the next one.

    x = noise.initial at timesteps[0]; at each t, x̂0 = x̂0(x_t) (Tweedie, one denoiser call); before the
    next timestep t', x_t' = √ᾱ_t'·x̂0 + √(1−ᾱ_t')·(√(1−η²)·ε̂ + η·ξ) with ξ = noise.steps[i]: η=1 draws
    fresh noise (LCM, SDXL-Turbo), η=0 reuses the predicted ε̂ (deterministic, DDIM-like). When
    autograd is on, gradient flows through every step (each denoiser call checkpointed), also
    through the re-noised x̂0 into the next step.
    """
    schedule = backend.schedule
    x, x0s, inputs = noise.initial, [], []

    def model_output(x_in, t):
        return backend.predict(x_in, t, cond, guidance)

    for i, t in enumerate(timesteps):
        inputs.append(x)
        grad = torch.is_grad_enabled()
        out = checkpoint(model_output, x, t, use_reentrant=False) if grad and use_checkpoint else model_output(x, t)
        x0, eps = schedule.x0_and_eps(out, x, t)
        x0s.append(x0)
        if i + 1 < len(timesteps):
            fresh = (1 - renoise_eta**2) ** 0.5 * eps + renoise_eta * noise.steps[i]
            x = schedule.add_noise(x0, fresh, timesteps[i + 1])
    return FewStepResult(x0s=x0s, inputs=inputs, timesteps=list(timesteps))
