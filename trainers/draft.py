"""DRaFT: Direct Reward Fine-Tuning (Clark, Vicol, Swersky, Fleet; arXiv 2309.17400, ICLR 2024).

Backpropagate the reward of the decoded sample through the sampler into the LoRA:
- full DRaFT: gradient through every step (K = sampling steps);
- DRaFT-K: gradient through the last K steps only (K=1 recommended: larger K explodes gradients);
- DRaFT-LV: sample x0 without gradient, re-noise it n times to the last timestep, re-run the last
  step through the LoRA'd denoiser for each copy and average the n rewards.
The rollouts themselves live in comfy_rft.truncation, shared with RSA-FT.
"""

from __future__ import annotations

from dataclasses import dataclass

from comfy_rft.config import TrainConfig, option
from comfy_rft.errors import UserError
from comfy_rft.loop import Method, StepOutput
from comfy_rft.sampler import Boundary
from comfy_rft.truncation import Truncation, reward_latents


@dataclass
class DraftConfig(TrainConfig):
    """DRaFT with the paper's small-scale defaults (aesthetic: r=8, lr 4e-4, batch 4, 50 DDIM steps, CFG 7.5)."""

    batch_size: int = option(4, "Prompts per micro-batch (paper, small scale: 4).", min=1)
    k: int = option(1, "DRaFT-K: backpropagate through the last K sampling steps. K=1 is the paper's "
                    "recommendation; K equal to --sampling-steps is full DRaFT.", min=1)
    lv_samples: int = option(0, "DRaFT-LV: number n of re-noised copies of the final sample whose last step is "
                             "re-run with gradient (paper: n=2). 0 disables LV. Requires K=1.", min=0)

    def truncation(self) -> Truncation:
        if self.lv_samples:
            return Truncation("draft-lv", lv_samples=self.lv_samples)
        return Truncation("draft-k", k=self.k)


class DraftMethod(Method):
    name = "draft"

    def check(self) -> None:
        super().check()
        c = self.config
        if c.truncation().base == "draft-lv" and c.k != 1:
            raise UserError(f"DRaFT-LV re-runs only the last step, so it needs K=1 (got --k {c.k}); "
                            f"drop --lv-samples or use --k 1")
        c.truncation().validate(c.sampling_steps)

    def rollout(self, prompts: list[str], seed: int, start: Boundary | None = None):
        """Decoded images carrying gradient per the config's truncation, the prompt of each image, and the
        boundary where the gradient starts (`start`: re-run only from there, as in `reward_latents`)."""
        c, backend = self.config, self.backend
        cond = backend.encode(prompts, self.size, self.size)
        latents, prompts, boundary = reward_latents(backend, cond, prompts, self.noise(len(prompts), seed), seed,
                                                    c.truncation(), num_steps=c.sampling_steps, eta=c.eta,
                                                    guidance=c.guidance, use_checkpoint=c.grad_checkpointing,
                                                    start=start)
        return backend.decode(latents, use_checkpoint=c.grad_checkpointing), prompts, boundary

    def loss(self, prompts: list[str], seed: int) -> StepOutput:
        images, prompts, _ = self.rollout(prompts, seed)
        rewards = self.reward(images, prompts)
        return StepOutput(loss=-rewards.mean(), rewards=rewards.detach())
