"""RSA-FT: Reward Sharpness-Aware Fine-Tuning (Kim & Sim; arXiv 2603.21175, CVPR 2026).

Reward models are sharp around generated images, and following their raw gradient hacks them.
RSA-FT maximises a flattened reward, max_θ E[ r( D(x0(x_T, c; θ + ε)) + δ, c ) ] (Eq. 19), with
one-step worst-case perturbations in two spaces, both taken at the unperturbed θ and sample
(Eqs. 15 and 17):

    image space      δ = −ρ   · ∇ₓ r / ‖∇ₓ r‖    per sample, on the decoded image in [0, 1]
    parameter space  ε = −ρ_ω · ∇_θ r / ‖∇_θ r‖  one global norm over the LoRA parameters (SAM)

One iteration (research/algorithms.md §3.2), line by line in `RsaftMethod.loss`:
    1. x0 = base rollout at θ (DRaFT-K, DRaFT-LV, ReFL or AlignProp truncation), img = D(x0)
    2. one backward of R = Σ r(img) gives ∇_img R and ∇_θ R
    3. δ and ε from them (detached); θ ← θ + ε
    4. x0' = the same rollout at θ + ε with the same noises (and the same random truncation choices);
       `--sam-rollout shared-prefix` starts it where the gradient starts, reusing the no-gradient steps
    5. L = −mean r(D(x0') + δ); L.backward()           (the loop)
    6. θ ← θ (restored exactly) before clipping and the AdamW step (`after_backward`)

The paper's text is unverified in places (only secondary notes could be read): the order of the
two perturbations (δ at θ by default, or recomputed at θ + ε: `--delta-at`), the space of δ (we use
the decoded image in [0, 1], the reward's input space), absolute vs relative ρ_ω (plain SAM by
default, ASAM's parameter-scaled radius as `--rho-param-scale relative`), and whether the rollout at
θ + ε re-runs the steps without gradient (yes by default, as Eq. 19 is written: `--sam-rollout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfy_rft.config import option
from comfy_rft.loop import StepOutput
from comfy_rft.rewards.robust import reward_and_direction, unit_per_sample
from comfy_rft.truncation import BASES, Truncation

from .draft import DraftConfig, DraftMethod


@dataclass
class RsaftConfig(DraftConfig):
    """RSA-FT around a DRaFT-family base, with the reported defaults (ρ = ρ_ω = 1e-2, AdamW lr 2e-5, wd 1e-4)."""

    lr: float = option(2e-5, "AdamW learning rate (paper: 2e-5).", min=0.0)
    weight_decay: float = option(1e-4, "AdamW weight decay (paper: 1e-4).", min=0.0)
    base: str = option("draft-k", "The reward-backprop method RSA-FT wraps: draft-k (with --k), draft-lv (with "
                       "--lv-samples), refl (with --refl-window), alignprop (with --alignprop-k-min/max).",
                       choices=BASES)
    lv_samples: int = option(2, "draft-lv base: re-noised copies of x0 whose last step is re-run (paper: 2).", min=1)
    refl_window: int = option(10, "refl base: stop at a step drawn uniformly from the last N sampling steps and "
                              "score x̂0 predicted there (ReFL: steps 30-39 of 40, i.e. N=10).", min=1)
    alignprop_k_min: int = option(1, "alignprop base: smallest K of the randomly drawn truncation.", min=1)
    alignprop_k_max: int = option(4, "alignprop base: largest K of the randomly drawn truncation (unverified: "
                                  "AlignProp's exact range is not known to us).", min=1)
    rho: float = option(1e-2, "Image-space radius ρ: L2 norm of δ on the decoded image in [0, 1] (paper: 1e-2; "
                        "whether the paper means [0,1], [-1,1] or latents is unverified).", min=0.0)
    rho_param: float = option(1e-2, "Parameter-space radius ρ_ω of the SAM perturbation of the LoRA (paper: 1e-2).",
                              min=0.0)
    image_perturbation: bool = option(True, "Use the image-space perturbation δ (ablation switch).")
    param_perturbation: bool = option(True, "Use the parameter-space (SAM) perturbation ε (ablation switch).")
    delta_at: str = option("theta", "Where δ is computed: 'theta' (the paper's Eqs. 15/19 as read: from the first, "
                           "unperturbed rollout) or 'perturbed' (recomputed on the rollout at θ + ε, image "
                           "perturbation after the parameter one; one extra reward backward).",
                           choices=("theta", "perturbed"))
    sam_rollout: str = option("full", "The rollout at θ + ε: 'full' re-samples from x_T at θ + ε (Eq. 19 as written, "
                              "about 2x the base step); 'shared-prefix' keeps the steps without gradient from the "
                              "rollout at θ and re-runs only the steps with gradient at θ + ε: exact SAM on the "
                              "base method's truncated objective, which treats those steps as constants (DRaFT-1 at "
                              "50 steps: about 1.2x the base step; the paper's choice is unknown).",
                              choices=("full", "shared-prefix"))
    rho_param_scale: str = option("absolute", "'absolute': plain SAM, ε = ρ_ω g/‖g‖ (the paper, as read); "
                                  "'relative': ASAM, ε = ρ_ω θ²g/‖θ g‖ (scale-invariant radius).",
                                  choices=("absolute", "relative"))

    def truncation(self) -> Truncation:
        return Truncation(self.base, k=self.k, lv_samples=self.lv_samples, refl_window=self.refl_window,
                          alignprop_k=(self.alignprop_k_min, self.alignprop_k_max))


class RsaftMethod(DraftMethod):
    """Logs per step: proxy_reward r(x), robust_reward r(x + δ), sharpness_s1 (Eq. 10 at θ) and grad_norm_theta
    (‖∇_θ r‖ at θ); the loop's grad_norm is the gradient applied, the one taken at θ + ε."""

    name = "rsaft"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._theta: list[torch.Tensor] | None = None  # θ saved while the LoRA sits at θ + ε

    def loss(self, prompts: list[str], seed: int) -> StepOutput:
        c = self.config
        images, scored, boundary = self.rollout(prompts, seed)  # 1. at θ
        metrics = {}
        if c.param_perturbation:
            rewards = self.reward(images, scored)  # 2. one backward gives both gradients
            grads = torch.autograd.grad(rewards.sum(), [images, *self.params], allow_unused=True)
            rewards = rewards.detach()
            delta = -c.rho * unit_per_sample(grads[0])  # 3.
            grad_theta = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads[1:])]
            epsilon, metrics["grad_norm_theta"] = self._epsilon(grad_theta)
            self._theta = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, e in zip(self.params, epsilon):
                    p.add_(e)
            start = boundary if c.sam_rollout == "shared-prefix" else None
            scored_images, _, _ = self.rollout(prompts, seed, start)  # 4. same seed: same noises and truncation draws
            if c.delta_at == "perturbed":
                delta_scored = -c.rho * reward_and_direction(self.reward, scored_images, scored)[1]
            else:
                delta_scored = delta
        else:  # image-only (or neither): δ from this rollout, which is also the one scored
            rewards, direction = reward_and_direction(self.reward, images, scored)
            delta = delta_scored = -c.rho * direction
            scored_images = images
        robust = self.reward(scored_images + delta_scored if c.image_perturbation else scored_images, scored)  # 5.
        # S1 at θ: how far the worst small perturbation drops the reward (image-only has just scored r(x + δ) at θ)
        if c.image_perturbation and scored_images is images:
            perturbed = robust.detach()
        else:
            with torch.no_grad():
                perturbed = self.reward(images.detach() + delta, scored)
        metrics.update(proxy_reward=rewards.mean().item(), robust_reward=robust.detach().mean().item(),
                       sharpness_s1=(rewards - perturbed).mean().item())
        return StepOutput(loss=-robust.mean(), rewards=rewards, metrics=metrics)

    def after_backward(self) -> None:
        """6. θ + ε -> θ, bit for bit (a copy, not a subtraction): the gradient stays, applied to θ."""
        if self._theta is not None:
            with torch.no_grad():
                for p, saved in zip(self.params, self._theta):
                    p.copy_(saved)
            self._theta = None

    def _epsilon(self, grad_theta: list[torch.Tensor]):
        """ε = −ρ_ω·g/‖g‖ with g = ∇_θ r (the SAM ascent on the loss −r), or ASAM's scaled version."""
        c = self.config
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grad_theta))
        if c.rho_param_scale == "absolute":
            return [-c.rho_param * g / norm.clamp_min(1e-12) for g in grad_theta], norm.item()
        scaled_norm = torch.sqrt(sum((p.detach() * g).pow(2).sum() for p, g in zip(self.params, grad_theta)))
        return [-c.rho_param * p.detach().pow(2) * g / scaled_norm.clamp_min(1e-12)
                for p, g in zip(self.params, grad_theta)], norm.item()
