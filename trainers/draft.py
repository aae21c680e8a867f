"""DRaFT: Direct Reward Fine-Tuning (Clark, Vicol, Swersky, Fleet; arXiv 2309.17400, ICLR 2024).

Backpropagate the reward of the decoded sample through the sampler into the LoRA:
- full DRaFT: gradient through every step (K = sampling steps);
- DRaFT-K: gradient through the last K steps only (K=1 recommended: larger K explodes gradients);
- DRaFT-LV: sample x0 without gradient, re-noise it n times to the last timestep t1, re-run the last
  step through the LoRA'd denoiser for each copy and average the n rewards (x0 itself is not
  scored). Unlike a public baseline, the denoiser IS re-evaluated on each re-noised input, so the
  extra samples carry gradient (research/algorithms.md §2.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from comfy_rft.config import TrainConfig, option
from comfy_rft.errors import UserError
from comfy_rft.loop import Method, StepOutput, derive_seed
from comfy_rft.sampler import GradPolicy, sample


@dataclass
class DraftConfig(TrainConfig):
    """DRaFT with the paper's small-scale defaults (aesthetic: r=8, lr 4e-4, batch 4, 50 DDIM steps, CFG 7.5)."""

    batch_size: int = option(4, "Prompts per micro-batch (paper, small scale: 4).", min=1)
    k: int = option(1, "DRaFT-K: backpropagate through the last K sampling steps. K=1 is the paper's "
                    "recommendation; K equal to --sampling-steps is full DRaFT.", min=1)
    lv_samples: int = option(0, "DRaFT-LV: number n of re-noised copies of the final sample whose last step is "
                             "re-run with gradient (paper: n=2). 0 disables LV. Requires K=1.", min=0)


class DraftMethod(Method):
    name = "draft"

    def check(self) -> None:
        super().check()
        c = self.config
        if c.k > c.sampling_steps:
            raise UserError(f"K={c.k} is larger than the number of sampling steps ({c.sampling_steps}): "
                            f"lower --k or raise --sampling-steps (K equal to the steps is full DRaFT)")
        if c.lv_samples and c.k != 1:
            raise UserError(f"DRaFT-LV re-runs only the last step, so it needs K=1 (got --k {c.k}); "
                            f"drop --lv-samples or use --k 1")

    def loss(self, prompts: list[str], seed: int) -> StepOutput:
        c, backend = self.config, self.backend
        cond = backend.encode(prompts, self.size, self.size)
        policy = GradPolicy("none") if c.lv_samples else GradPolicy("last_k", k=c.k)
        result = sample(backend, cond, self.noise(len(prompts), seed), num_steps=c.sampling_steps, eta=c.eta,
                        guidance=c.guidance, policy=policy, use_checkpoint=c.grad_checkpointing)
        if c.lv_samples:
            latents, prompts = self._lv_last_step(result.latents.detach(), cond, prompts, seed)
        else:
            latents = result.latents
        rewards = self.reward(backend.decode(latents, use_checkpoint=c.grad_checkpointing), prompts)
        return StepOutput(loss=-rewards.mean(), rewards=rewards.detach())

    def _lv_last_step(self, x0, cond, prompts, seed):
        """Re-noise x0 to the last timestep t1 n times and re-run that step with gradient (DRaFT-LV)."""
        c, schedule = self.config, self.backend.schedule
        n = c.lv_samples
        t1 = schedule.timesteps(c.sampling_steps)[-1]
        gen = torch.Generator("cpu").manual_seed(derive_seed(seed, "lv"))
        renoise, step_noise = torch.randn((2, n * x0.shape[0], *x0.shape[1:]), generator=gen).to(x0)
        x1 = schedule.add_noise(x0.repeat_interleave(n, 0), renoise, t1)
        cond_n = cond.repeat_interleave(n)

        def model_output(x):
            return self.backend.predict(x, t1, cond_n, c.guidance)

        out = checkpoint(model_output, x1, use_reentrant=False) if c.grad_checkpointing else model_output(x1)
        step = schedule.step_distribution(out, x1, t1, schedule.previous(t1, c.sampling_steps), c.eta)
        return step.mean + step.std * step_noise, [p for p in prompts for _ in range(n)]
