"""DDIM/DDPM step math for ε- and v-prediction models, as pure tensor functions.

The formulas are diffusers' `DDIMScheduler.step` written out (tests check equality) so that the
mean and std of every step are available: KL terms, replay buffers and reparameterised steps need
them, and the scheduler object hides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepDistribution:
    """One sampler step as a Gaussian: x_prev = mean + std * noise; x0 is the step's x̂0 estimate."""

    mean: torch.Tensor
    std: torch.Tensor
    x0: torch.Tensor


class DDIMSchedule:
    """The noise schedule of a diffusers scheduler config, with DDIM(η) steps."""

    def __init__(self, scheduler_config):
        from diffusers import DDIMScheduler

        # Any SD scheduler config (PNDM, Euler, DDIM…) carries the same beta schedule.
        self._scheduler = DDIMScheduler.from_config(scheduler_config)
        self.prediction_type = self._scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r} (epsilon and v_prediction are)")
        self.num_train_timesteps = self._scheduler.config.num_train_timesteps
        self.alphas_cumprod = self._scheduler.alphas_cumprod.double()
        self.final_alpha_cumprod = float(self._scheduler.final_alpha_cumprod)
        self._lcm = None  # LCM's scheduler (consistency models), built when first needed

    def timesteps(self, num_steps: int) -> list[int]:
        """The scheduler's own timesteps (spacing and offset as configured), noisiest first."""
        self._scheduler.set_timesteps(num_steps)
        return [int(t) for t in self._scheduler.timesteps]

    def previous(self, t: int, num_steps: int) -> int:
        return t - self.num_train_timesteps // num_steps

    def alpha_bar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def x0_and_eps(self, model_output: torch.Tensor, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂0 (Tweedie) and ε̂ from the model output at x_t."""
        a = self.alpha_bar(t)
        sa, s1a = a**0.5, (1 - a) ** 0.5
        if self.prediction_type == "epsilon":
            return (x - s1a * model_output) / sa, model_output
        return sa * x - s1a * model_output, sa * model_output + s1a * x

    def step_distribution(self, model_output: torch.Tensor, x: torch.Tensor, t: int, t_prev: int, eta: float) -> StepDistribution:
        """DDIM step with η from t to t_prev (η=0 deterministic, η=1 DDPM-like)."""
        a, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        x0, eps = self.x0_and_eps(model_output, x, t)
        variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        std = eta * variance**0.5
        mean = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        return StepDistribution(mean=mean, std=torch.full((), std, dtype=x.dtype), x0=x0)

    def _lcm_scheduler(self):
        """diffusers' LCMScheduler on the same betas, its timesteps set to its distillation grid."""
        if self._lcm is None:
            from diffusers import LCMScheduler

            self._lcm = LCMScheduler.from_config(self._scheduler.config)
            self._lcm.set_timesteps(self._lcm.config.original_inference_steps)
        return self._lcm

    def consistency_timestep(self, t: int) -> int:
        """The timestep of LCM's distillation grid (its `original_inference_steps`, 50 by default: 999, 979, ...,
        19 for 1000 training steps) nearest to t: where an LCM is evaluated for a latent at t."""
        return int(min(self._lcm_scheduler().timesteps, key=lambda s: abs(int(s) - t)))

    def consistency_x0(self, model_output: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        """An LCM's x̂0 at x_t: c_skip(t)·x_t + c_out(t)·x̂0(model output), its boundary-condition parametrisation
        (the `denoised` of diffusers' `LCMScheduler.step`)."""
        c_skip, c_out = self._lcm_scheduler().get_scalings_for_boundary_condition_discrete(t)
        return c_out * self.x0_and_eps(model_output, x, t)[0] + c_skip * x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Forward diffusion q(x_t | x0)."""
        a = self.alpha_bar(t)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def schedule_from_alphas_cumprod(alphas_cumprod, prediction_type: str = "epsilon") -> DDIMSchedule:
    """A `DDIMSchedule` for a model known only by its ᾱ_t table and prediction type.

    For models loaded elsewhere (a ComfyUI MODEL's `model_sampling`, with ᾱ_t = 1 / (1 + σ_t²)): the
    betas are recovered from ᾱ_t and given to diffusers as `trained_betas`, with SD's DDIM spacing
    (leading, steps_offset 1, no final ᾱ = 1).
    """
    from diffusers import DDIMScheduler

    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    if alphas.numel() < 2 or not bool(((alphas > 0) & (alphas <= 1)).all()):
        raise ValueError("alphas_cumprod must hold at least two values in (0, 1]")
    betas = 1 - alphas / torch.cat([alphas.new_ones(1), alphas[:-1]])
    scheduler = DDIMScheduler(num_train_timesteps=len(alphas), trained_betas=betas.tolist(), clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return DDIMSchedule(scheduler.config)
