"""SQDF: Soft Q-based Diffusion Fine-tuning (Kang, Lee, Shin, Om, Park; arXiv 2512.04559, ICLR 2026).

KL-regularised RL, max E[r(x0)] − α·Σ_t KL(p_θ(·|x_t) ‖ p_ref(·|x_t)), through a reparameterised policy
gradient of a training-free, differentiable soft-Q estimate Q(x_t, x_{t−1}) ≈ γ^(T−1−k)·r(x̂0(x_{t−1})).
One update sample, for a (trajectory, step k) drawn from a replay buffer of earlier rollouts
(research/algorithms.md §4.2, the research code Shin-woocheol/SQDF):

    x' = μ_θ(x_t) + σ_t·ξ             one DDIM(η) step through the LoRA, reparameterised (fresh ξ)
    x̂0 = f_ψ(x')                      a consistency model (LCM-LoRA or LCM UNet), or Tweedie's x̂0 from the
                                      reference at t_{k+1} with CFG; on the last step x̂0 = x'
    L  = −γ^(T−1−k)·r(D(x̂0)) + α·KL   with KL = mean over latent dims of (μ_θ − μ_ref)²/σ_t²

The KL is the research code's: a mean over dimensions and no ½ (the exact Gaussian KL per dimension
has the ½, `--kl-half`); the α values of the paper and the code assume it. Gradient flows
x̂0 → x' → μ_θ → LoRA only: the buffer's x_t and the reference mean are constants, the consistency
model, the decoder and the reward are frozen. The reference is the same denoiser with its adapter
switched off, not a second copy.

Epochs on the shared loop: a rollout epoch is one optimiser step's global batch (batch size ×
accumulation × processes) sampled with the current LoRA without gradient (DDIM η, CFG), scored and
stored whole in the buffer, at the start of every `replay_ratio`-th optimiser step (`before_step`). Each
optimiser step then updates on a global batch of (trajectory, step) pairs drawn from the buffer, the
epoch just rolled out included, as the research code does. Every process rolls out its own slices of the
epoch and all of them receive every trajectory, so the buffer, the draws (from the step seed) and each
sample's noise (from its index in the global batch) do not depend on how the batch is split. The reward
a step reports is its epoch's rollout reward (on-policy samples); the update's r(x̂0) is `update_reward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfy_rft.config import TrainConfig, option
from comfy_rft.consistency import load_consistency_model
from comfy_rft.errors import UserError
from comfy_rft.loop import Method, StepOutput
from comfy_rft.lora import only_adapters
from comfy_rft.replay import SAMPLING, ReplayBuffer
from comfy_rft.sampler import GradPolicy, predict, sample
from comfy_rft.seeding import derive_seed

# --preset large: the paper's large-scale values, from secondary notes of the paper (unverified).
LARGE_PRESET = {"gamma": (0.9, 0.93), "alpha": (2.0, 0.05)}  # option: (small default, large value)


@dataclass
class SqdfConfig(TrainConfig):
    """SQDF with the research code's defaults (its aesthetic script: γ 0.9, α 2, lr 1e-3, LoRA r 4, 50 DDIM steps,
    η 1, CFG 5, buffer 1024, replay ratio 1)."""

    lr: float = option(1e-3, "AdamW learning rate (research code: 1e-3).", min=0.0)
    weight_decay: float = option(1e-4, "AdamW weight decay (research code: 1e-4).", min=0.0)
    batch_size: int = option(4, "Prompts per micro-batch, for rollouts and updates alike (research code: 4 per GPU, "
                             "8 accumulation steps, 2 GPUs).", min=1)
    lora_rank: int = option(4, "LoRA rank r (research code: 4; the paper's large runs: 32).", min=1)
    lora_alpha: float = option(4.0, "LoRA alpha; the update is scaled by alpha / rank and alpha is stored in the "
                               "file (research code: alpha = rank).", min=1e-8)
    sampling_steps: int = option(50, "DDIM steps T per rollout (research code: 50).", min=1)
    eta: float = option(1.0, "DDIM η of the rollouts and of the updated step. Must be > 0: the KL divides by the "
                        "step's variance σ_t², which η = 0 makes 0 (research code: 1).", min=0.0, max=1.0)
    guidance: float = option(5.0, "Classifier-free guidance of the rollouts, of the updated step and of the "
                             "reference (research code: 5).", min=1.0)
    preset: str = option("small", "'small': the research code's γ 0.9, α 2. 'large': the paper's large-scale "
                         "γ 0.93, α 0.05 (read from secondary notes, unverified); it replaces --gamma and --alpha "
                         "where they are left at the small values.", choices=("small", "large"))
    gamma: float = option(0.9, "Discount γ: the soft-Q estimate at step k (0 = noisiest) of T is γ^(T−1−k)·r(x̂0) "
                          "(research code: 0.9; --preset large: 0.93).", min=0.0, max=1.0)
    alpha: float = option(2.0, "KL weight α (research code: 2; --preset large: 0.05). Its scale follows the KL "
                          "convention, see --kl-half.", min=0.0)
    kl_half: bool = option(False, "KL per step = mean over latent dims of (μ_θ − μ_ref)²/(2σ_t²), the Gaussian "
                           "KL per dimension. Off: without the ½, as the research code, whose α values assume it.")
    consistency_model: str = option("", "The x̂0 predictor: a local LCM-LoRA .safetensors file for this base model "
                                    "(the paper: latent-consistency/lcm-lora-sdv1-5) or an LCM UNet folder. Empty: "
                                    "Tweedie's x̂0 from the reference model at the next timestep, with CFG (the "
                                    "paper's 'without CM' ablation).")
    buffer_size: int = option(1024, "Replay buffer capacity in trajectories, oldest out first (research code: "
                              "1024). At least one optimiser step's global batch.", min=1)
    replay_ratio: int = option(1, "Optimiser steps per rollout epoch (research code: 1).", min=1)
    buffer_sampling: str = option("uniform", "How updates draw (trajectory, step) pairs from the buffer: 'uniform' "
                                  "(trajectories without replacement, steps uniform; the research default), "
                                  "'newest' (the latest trajectories first, steps uniform), 'prioritized' "
                                  "(P ∝ max(r, 0)·γ^(T−1−k); trajectories equally likely while no reward is "
                                  "positive).", choices=SAMPLING)
    buffer_on_disk: bool = option(False, "Keep the buffer's latents in memory-mapped files under OUT/replay_buffer "
                                  "(unlinked at once, so nothing is left behind; the OS pages them in and out) "
                                  "instead of RAM. fp16 either way: a 50-step SD1.5 trajectory takes 0.8 MB.")
    mask_nonpositive_rewards: bool = option(False, "The research code's quirk: drop update samples whose r(x̂0) "
                                            "<= 0 from the loss (their KL too). Harmless for rewards that are "
                                            "positive by construction (its aesthetic score); with rewards that are "
                                            "often negative (ImageReward) it silently discards data, so it is "
                                            "off by default.")

    def __post_init__(self):
        if self.preset == "large":
            for name, (small, large) in LARGE_PRESET.items():
                if getattr(self, name) == small:
                    setattr(self, name, large)


@dataclass
class SoftQStep:
    """One reparameterised step and its x̂0 for a batch at the same step k (detached except where noted)."""

    mean: torch.Tensor  # μ_θ(x_t), through the LoRA
    ref_mean: torch.Tensor  # μ_ref(x_t), the adapter off, no gradient
    std: torch.Tensor  # σ_t
    x_next: torch.Tensor  # x' = μ_θ + σ_t ξ
    kl: torch.Tensor  # [B]
    x0: torch.Tensor  # x̂0(x')


class SqdfMethod(Method):
    name = "sqdf"

    def __init__(self, config: SqdfConfig, backend, reward):
        super().__init__(config, backend, reward)
        spill = f"{config.out}/replay_buffer" if config.buffer_on_disk else None
        self.buffer = ReplayBuffer(config.buffer_size, spill)
        self.consistency = load_consistency_model(backend, config.consistency_model) if config.consistency_model \
            else None
        self.epochs = 0  # rollout epochs done
        self.updates = 0  # optimiser steps begun
        self.rollout_rewards = torch.empty(0)  # the latest epoch's rewards, in global sample order
        self._plan: list[tuple[int, int]] = []  # this step's (buffer entry, step) per global sample
        self._plan_seed: int | None = None

    def check(self) -> None:
        super().check()
        c = self.config
        if c.eta <= 0:
            raise UserError("SQDF needs --eta > 0: its KL divides by the step variance σ_t², which DDIM η = 0 makes "
                            "0 (the research code uses η = 1)")
        if c.batch_size * c.grad_accum > c.buffer_size:
            raise UserError(f"--buffer-size {c.buffer_size} is smaller than one optimiser step's batch "
                            f"({c.batch_size} x {c.grad_accum} accumulation): raise it")
        schedule, zero = self.backend.schedule, torch.zeros(())
        for t in schedule.timesteps(c.sampling_steps):
            if schedule.step_distribution(zero, zero, t, schedule.previous(t, c.sampling_steps), c.eta).std <= 0:
                raise UserError(f"the step from timestep {t} has no noise (σ_t = 0), so SQDF's KL is undefined there; "
                                f"use other --sampling-steps")

    # ---- rollout epochs ----------------------------------------------------------------------
    def before_step(self, global_batch: list[str], seed: int, procs) -> None:
        c = self.config
        if len(global_batch) > c.buffer_size:
            raise UserError(f"--buffer-size {c.buffer_size} is smaller than one optimiser step's global batch "
                            f"({len(global_batch)} over {procs.world} processes): raise it")
        if self.updates % c.replay_ratio == 0:
            self.rollout(global_batch, seed, procs)
        self.updates += 1
        draws = torch.Generator().manual_seed(derive_seed(seed, "sqdf-replay"))
        self._plan = self.buffer.sample(len(global_batch), c.buffer_sampling, draws, c.gamma)
        self._plan_seed = seed

    @torch.no_grad()
    def rollout(self, global_batch: list[str], seed: int, procs) -> None:
        """Sample the epoch (this process's slices), score it, and store every trajectory in every process's buffer."""
        c, backend, b = self.config, self.backend, self.config.batch_size
        trajectories, rewards = [], []
        for first in range(procs.rank * b, len(global_batch), procs.world * b):  # slices (m·world + rank)·b
            prompts = global_batch[first:first + b]
            cond = backend.encode(prompts, self.size, self.size)
            result = sample(backend, cond, self.noise(len(prompts), seed, first), num_steps=c.sampling_steps,
                            eta=c.eta, guidance=c.guidance, policy=GradPolicy("none"), record=True)
            rewards.append(self.reward(backend.decode(result.latents), prompts).float())
            trajectories.append(torch.stack(result.trajectory.latents, dim=1).half())
        latents, scores = (_in_sample_order(procs, b, torch.cat(parts)) for parts in (trajectories, rewards))
        self.epochs += 1
        self.buffer.add(latents.cpu(), global_batch, scores.cpu(), self.epochs)
        self.rollout_rewards = scores.cpu()

    # ---- updates -----------------------------------------------------------------------------
    def soft_q_step(self, x: torch.Tensor, k: int, prompts: list[str], noise: torch.Tensor) -> SoftQStep:
        """Step k (0 = noisiest) from the latents x, all at its timestep: μ_θ, μ_ref, σ_t, x', the KL and x̂0(x')."""
        c, backend, schedule = self.config, self.backend, self.backend.schedule
        timesteps = schedule.timesteps(c.sampling_steps)
        t = timesteps[k]
        t_next = schedule.previous(t, c.sampling_steps)
        cond = backend.encode(prompts, self.size, self.size)
        out = predict(backend, x, t, cond, c.guidance, c.grad_checkpointing)  # through the LoRA
        with torch.no_grad(), only_adapters(backend.denoiser, ()):
            ref_out = backend.predict(x, t, cond, c.guidance)
        step = schedule.step_distribution(out, x, t, t_next, c.eta)
        ref_mean = schedule.step_distribution(ref_out, x, t, t_next, c.eta).mean
        x_next = step.mean + step.std * noise
        kl = (step.mean - ref_mean).pow(2).flatten(1).mean(1) / step.std**2 * (0.5 if c.kl_half else 1.0)
        if k == c.sampling_steps - 1:
            x0 = x_next  # the last step's sample is x0 itself
        elif self.consistency is not None:
            x0 = self.consistency.x0(x_next, t_next, cond, c.grad_checkpointing)
        else:  # Tweedie from the reference at t_{k+1}, with CFG; gradient to x', not to the LoRA
            ref_next = predict(backend, x_next, t_next, cond, c.guidance, c.grad_checkpointing, adapters=())
            x0 = schedule.x0_and_eps(ref_next, x_next, t_next)[0]
        return SoftQStep(mean=step.mean, ref_mean=ref_mean, std=step.std, x_next=x_next, kl=kl, x0=x0)

    def step_noise(self, seed: int, index: int, shape) -> torch.Tensor:
        """ξ of the update sample `index` of the step's global batch (its own seed: the split does not matter)."""
        generator = torch.Generator("cpu").manual_seed(derive_seed(seed, "sqdf-step-noise", index))
        return torch.randn(shape, generator=generator)

    def loss(self, prompts: list[str], seed: int) -> StepOutput:
        """The micro-batch's update samples are this step's draws at its sample indices; `prompts` were rolled out
        in `before_step` (the updates use the prompts stored with the drawn trajectories)."""
        if self._plan_seed != seed:
            raise RuntimeError("SqdfMethod.loss needs before_step() of the same step first "
                               "(comfy_rft.loop.step_gradients calls both)")
        c, backend, first = self.config, self.backend, self.sample_offset
        picks = self._plan[first:first + len(prompts)]
        scored = [self.buffer.prompts[entry] for entry, _ in picks]
        x0, kl = [None] * len(picks), [None] * len(picks)
        for k in sorted({k for _, k in picks}):  # one batch per step index: the timestep is shared
            rows = [j for j, (_, step) in enumerate(picks) if step == k]
            x = torch.stack([self.buffer.latent(picks[j][0], k) for j in rows]).to(backend.device, torch.float32)
            noise = torch.stack([self.step_noise(seed, first + j, x.shape[1:]) for j in rows]).to(x)
            result = self.soft_q_step(x, k, [scored[j] for j in rows], noise)
            for row, j in enumerate(rows):
                x0[j], kl[j] = result.x0[row], result.kl[row]
        x0, kl = torch.stack(x0), torch.stack(kl)
        rewards = self.reward(backend.decode(x0, use_checkpoint=c.grad_checkpointing), scored)
        discount = torch.tensor([c.gamma ** (c.sampling_steps - 1 - k) for _, k in picks], device=rewards.device)
        per_sample = -discount * rewards + c.alpha * kl
        metrics = {"kl": kl.mean().item(), "q_estimate": (discount * rewards).mean().item(),
                   "update_reward": rewards.mean().item(), "buffer_size": float(len(self.buffer)),
                   "buffer_age": sum(self.epochs - self.buffer.epochs[e] for e, _ in picks) / len(picks)}
        if c.mask_nonpositive_rewards:
            keep = (rewards > 0).to(per_sample)
            per_sample = per_sample * keep
            metrics["masked_fraction"] = 1.0 - keep.mean().item()
        return StepOutput(loss=per_sample.mean(), rewards=self.rollout_rewards[first:first + len(prompts)],
                          metrics=metrics)

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "epochs": self.epochs, "updates": self.updates,
                "rollout_rewards": self.rollout_rewards}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.epochs, self.updates = state["epochs"], state["updates"]
        self.rollout_rewards = state["rollout_rewards"]


def _in_sample_order(procs, b: int, local: torch.Tensor) -> torch.Tensor:
    """Every process's slices of an epoch, gathered on every process in global sample order: process r's m-th
    slice of b samples is slice m·world + r of the global batch."""
    if procs.world == 1:
        return local
    parts = procs.gather(local).split(b)  # rank-major: process r's slice m at r·accum + m
    accum = len(parts) // procs.world
    return torch.cat([parts[r * accum + m] for m in range(accum) for r in range(procs.world)])
