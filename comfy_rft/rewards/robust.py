"""The perturbation-robust reward gradient (RSA-FT's image-space part) and the sharpness metric S1.

A reward model is sharp: tiny pixel changes can raise its score without making a better image, and
plain reward gradients find those changes (reward hacking). Scoring x + δ with the worst-case small
perturbation δ = −ρ·∇ₓr/‖∇ₓr‖ (per sample, no gradient through δ) makes the trainer follow rewards
that survive perturbation (research/algorithms.md §3). ρ is a distance in the reward's input space,
images in [0, 1]: the L2 norm of δ over the whole image.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import Reward

MODES = ("adversarial", "smooth")


def unit_per_sample(grad: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient scaled to unit L2 norm (zero where the gradient is zero)."""
    norms = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    return grad / norms.clamp_min(1e-12)


def reward_and_direction(reward: Reward, images: torch.Tensor, prompts: list[str]):
    """r(x) and ∇ₓr / ‖∇ₓr‖ per sample, both detached: the scores come free with the direction of steepest
    reward increase in image space, so callers that need both score once."""
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        values = reward(x, prompts)
        (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), unit_per_sample(grad)


class RobustReward(Reward):
    """r(x + δ): adversarial δ = −ρ·∇ₓr/‖∇ₓr‖, or Gaussian smoothing: mean of r(x + ρ·ξ) over `samples` copies."""

    def __init__(self, reward: Reward, rho: float = 0.01, mode: str = "adversarial", samples: int = 4):
        super().__init__()
        if not reward.differentiable:
            raise UserError(f"the robust reward gradient needs a differentiable reward; {reward.name} is not")
        if mode not in MODES:
            raise UserError(f"robust mode {mode!r} is not known; use one of {', '.join(MODES)}")
        if rho < 0 or samples < 1:
            raise UserError(f"robust reward needs rho >= 0 and samples >= 1 (got rho={rho}, samples={samples})")
        self.inner, self.rho, self.mode, self.samples = reward, float(rho), mode, int(samples)
        self.name = f"{reward.name}(rho={self.rho:g}, robust={mode})"
        self.typical_range = reward.typical_range

    def forward(self, images, prompts):
        if self.rho == 0:
            return self.inner(images, prompts)
        if self.mode == "adversarial":
            return self.inner(images - self.rho * reward_and_direction(self.inner, images, prompts)[1], prompts)
        noise = torch.randn((self.samples, *images.shape), device=images.device, dtype=images.dtype)
        return torch.stack([self.inner(images + self.rho * n, prompts) for n in noise]).mean(0)


def sharpness(reward: Reward, images: torch.Tensor, prompts: list[str], rho: float = 0.01) -> torch.Tensor:
    """S1 = E[r(x) − r(x − ρ∇r/‖∇r‖)]: how much the score drops under the worst small perturbation."""
    clean, direction = reward_and_direction(reward, images, prompts)
    with torch.no_grad():
        perturbed = reward(images - rho * direction, prompts)
    return (clean - perturbed).mean()
