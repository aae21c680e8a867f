"""LaSRO: Latent-Space Surrogate Reward Optimization (Jia, Nan, Zhao, Liu; arXiv 2411.15247, CVPR 2025).

Fine-tunes a 1–2-step generator (SDXL-Turbo, SD-Turbo, LCM) against ANY reward, including
non-differentiable ones (JPEG size, OCR, a user callable), by following the gradient of a
differentiable surrogate R_ψ(z, c) learned online in latent space (comfy_rft/rewards/surrogate.py).

One optimiser step (research/algorithms.md §5.2), in `LasroMethod.loss`:
    (b) every `generator_steps` steps, a surrogate round: N_s samples per prompt from fresh noises
        (off-policy exploration), labelled by the true reward; the surrogate's pairwise accuracy on
        them is measured BEFORE it trains on them (the hacking detector); they join a FIFO buffer,
        and the surrogate takes `surrogate_steps` Bradley–Terry steps on buffer minibatches.
        Stage 1 (`surrogate_warmup` extra rounds) runs before the first generator step.
    (a) the generator step: z1 = x̂0(x_T) (1-step output), z2 = x̂0(re-noise(z1) at t2) (2-step output),
        gradient through both steps into the LoRA;
        L = −c1·S[R_ψ(z1)] − c2·S[R_ψ(z2)] + c·Σ_steps ‖x̂0_θ − x̂0_base‖²
        with S = (R − running mean) / running max-deviation, clipped. The samples are also scored
        with the true reward (the loop's reward_mean is the true reward) and join the buffer.

Unverified against the paper (no full text was readable; algorithms.md §10): the head and which
UNet blocks and timestep feed it, N_s, learning rates, buffer size, the constants of S, c/c1/c2,
and the alternation ratio (only "1–10 generator : 1–50 surrogate steps" is reported). Each option
says which value was chosen and why. The paper's regulariser is the LCM distillation loss; here it
is the simpler pull toward the base model's own few-step predictions (adapter off).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from comfy_rft.config import TrainConfig, option
from comfy_rft.distributed import Processes
from comfy_rft.errors import UserError
from comfy_rft.lora import only_adapters
from comfy_rft.loop import Method, StepOutput
from comfy_rft.rewards.surrogate import (TUNE_CHOICES, Surrogate, bradley_terry_loss, load_surrogate,
                                         pair_accuracy)
from comfy_rft.sampler import SamplerNoise, few_step_sample
from comfy_rft.seeding import derive_seed


@dataclass
class LasroConfig(TrainConfig):
    """LaSRO: a 1–2-step generator trained against any reward through a latent surrogate learned online."""

    batch_size: int = option(2, "Prompts per micro-batch of the generator step.", min=1)
    lr: float = option(4e-4, "AdamW learning rate of the generator's LoRA. Unverified (the paper's is unknown): the "
                       "library's SD-scale default; the embedded tiny model wants about 1e-2.", min=0.0)
    sampling_steps: int = option(2, "Generator steps: 1 (x̂0 of one denoiser call) or 2 (x̂0, re-noised to the "
                                 "second timestep, x̂0 again), the Turbo/LCM way (paper: 2-step models).", min=1, max=2)
    timesteps: str = option("", "The generator's timesteps, noisiest first, comma-separated, one per sampling step "
                            "(e.g. 999 or 999,499). Empty: 999 for one step, 999,499 for two (the trailing spacing "
                            "of LCM and SDXL-Turbo).")
    eta: float = option(1.0, "Re-noising before the second step: 1 draws fresh noise (LCM, SDXL-Turbo), 0 reuses the "
                        "predicted ε̂ (deterministic), in between mixes them as √(1−η²)·ε̂ + η·ξ. Unused with one "
                        "step.",
                        min=0.0, max=1.0)
    guidance: float = option(1.0, "Classifier-free guidance scale; 1 (none) is how distilled few-step models "
                             "(Turbo, LCM) sample.", min=1.0)
    samples_per_prompt: int = option(4, "N_s: samples per prompt, from different noises, labelled by the true reward "
                                     "in each surrogate round (the off-policy exploration). Unverified (the paper's "
                                     "N_s is unknown); 4 gives 6 ranked pairs per prompt and output.", min=2)
    generator_steps: int = option(1, "Generator (LoRA) steps per surrogate round. The paper reportedly alternates 1-10 "
                                  "generator with 1-50 surrogate steps (unverified); 1 keeps the surrogate closest to "
                                  "the moving generator.", min=1)
    surrogate_steps: int = option(4, "Bradley–Terry steps on the surrogate per round (paper: 1-50, unverified). 4 "
                                  "keeps the tiny CPU model's step fast while the surrogate tracks the generator.",
                                  min=0)
    surrogate_warmup: int = option(4, "Stage 1: surrogate rounds (exploration + Bradley–Terry steps) before the "
                                   "first generator step, so the generator starts from a surrogate that ranks better "
                                   "than chance. Unverified (the paper pre-trains on generator samples, length "
                                   "unknown).", min=0)
    surrogate_lr: float = option(1e-3, "AdamW learning rate of the surrogate (head from scratch; unverified).",
                                 min=0.0)
    surrogate_batch: int = option(32, "Buffer samples per Bradley–Terry step, drawn whole prompt groups at a time so "
                                  "every step sees same-prompt pairs.", min=2)
    buffer_size: int = option(512, "Labelled samples kept (first in, first out): latents, prompt and true reward. "
                              "Unverified (the paper's buffer size is unknown).", min=2)
    surrogate_timestep: int = option(50, "t_s: the fixed timestep at which the surrogate's UNet encoder reads the "
                                     "latent (√ᾱ_t·z, no noise: a reward must be deterministic). Small, so the encoder "
                                     "sees a nearly clean latent as it was trained to; unverified (the paper's t is "
                                     "unknown, 'near 0').", min=0)
    surrogate_depth: int = option(-1, "UNet encoder levels the surrogate head reads: 0 = only conv_in's output (the "
                                  "latent's own texture), k = also the first k down blocks' outputs, -1 = every down "
                                  "block and the mid block (the whole encoder, as the paper's backbone). Shallow "
                                  "levels carry the pixel-level detail that rewards like JPEG size depend on, deep "
                                  "ones the content; only the levels read are copied and run.", min=-1)
    surrogate_tune: str = option("head", "What the surrogate trains: 'head' (the pooled head on frozen encoder "
                                 "features; fast, and what the tiny CPU model learns quickest with), 'head+last' "
                                 "(also the deepest encoder block it reads), 'all' (the whole encoder copy). The base "
                                 "model is never changed.", choices=TUNE_CHOICES)
    surrogate_width: int = option(64, "Channels of the surrogate head (per-feature-map conv and MLP width).", min=1)
    surrogate_regression: float = option(0.0, "Weight of an extra MSE regression of the surrogate on the "
                                         "standardised true reward (0: Bradley–Terry only, as the paper describes).",
                                         min=0.0)
    surrogate_init: str = option("", "Start from this surrogate file (the *_surrogate.safetensors an earlier LaSRO run "
                                 "wrote for the same model and surrogate options) instead of a fresh head.")
    freeze_surrogate_after: int = option(0, "Ablation: stop training the surrogate after N generator steps (0: never). "
                                         "Rounds still run, so its accuracy on fresh samples and surrogate_gap keep "
                                         "being logged: a frozen surrogate gets hacked (the paper's finding).", min=0)
    one_step_weight: float = option(1.0, "c1: weight of the surrogate reward of the 1-step output z1 (the paper "
                                    "optimises both outputs; values unverified).", min=0.0)
    two_step_weight: float = option(1.0, "c2: weight of the surrogate reward of the 2-step output z2 (unused with one "
                                    "step; unverified).", min=0.0)
    base_regularizer: float = option(0.0, "c: weight of Σ‖x̂0_θ − x̂0_base‖² (mean over elements) between the LoRA's "
                                     "and the base model's x̂0 at the same inputs, a pull toward the base few-step "
                                     "model (the paper uses the LCM distillation loss; c unverified). 0 disables it.",
                                     min=0.0)
    normalizer_momentum: float = option(0.1, "S: momentum of the running mean and running max-deviation of the "
                                        "surrogate's values that normalise the generator loss (unverified).",
                                        min=0.0, max=1.0)
    normalizer_clip: float = option(3.0, "S: normalised surrogate values are clipped to ±this; beyond it a sample "
                                    "gets no more push (the paper clips so early large surrogate gradients cannot "
                                    "wreck the few-step map; value unverified).", min=0.0)

    def timestep_list(self, num_train_timesteps: int) -> list[int]:
        """The generator's timesteps, checked (UserError naming the fix)."""
        n = self.sampling_steps
        if not self.timesteps.strip():
            return [num_train_timesteps - 1 - i * num_train_timesteps // 2 for i in range(n)]
        try:
            steps = [int(t) for t in self.timesteps.split(",")]
        except ValueError:
            raise UserError(f"--timesteps {self.timesteps!r}: write integers separated by commas, e.g. "
                            f"999,499") from None
        if not 1 <= len(steps) <= 2:
            raise UserError(f"--timesteps {self.timesteps!r}: LaSRO trains 1- or 2-step generators, so give one or two "
                            f"timesteps (e.g. 999 or 999,499)")
        if len(steps) != n:
            raise UserError(f"--timesteps lists {len(steps)} timestep(s) but --sampling-steps is {n}; pass "
                            f"--sampling-steps {len(steps)} too")
        if not all(0 <= t < num_train_timesteps for t in steps) or (n == 2 and steps[1] >= steps[0]):
            raise UserError(f"--timesteps {self.timesteps!r}: each must be in [0, {num_train_timesteps - 1}], noisiest "
                            f"first (decreasing)")
        return steps


class LabelledBuffer:
    """FIFO of samples labelled by the true reward: latents (kept on the CPU), their prompts and rewards."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.latents = torch.empty(0)
        self.prompts: list[str] = []
        self.rewards = torch.empty(0)

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, latents: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> None:
        latents, rewards = latents.detach().float().cpu(), rewards.detach().float().cpu()
        self.latents = torch.cat([self.latents, latents]) if len(self) else latents
        self.rewards = torch.cat([self.rewards, rewards]) if len(self) else rewards
        self.prompts = self.prompts + list(prompts)
        drop = max(0, len(self) - self.capacity)
        self.latents, self.rewards, self.prompts = self.latents[drop:], self.rewards[drop:], self.prompts[drop:]

    def grouped_batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """Up to `size` indices, whole prompt groups in random order (samples shuffled within each), so a batch
        holds same-prompt pairs even when the buffer spans many prompts."""
        groups = group_ids(self.prompts)
        perm = torch.randperm(len(self), generator=generator)
        group_rank = torch.randperm(int(groups.max()) + 1, generator=generator)[groups[perm]]
        return perm[torch.argsort(group_rank, stable=True)][:size]

    def state_dict(self) -> dict:
        return {"latents": self.latents.clone(), "prompts": list(self.prompts), "rewards": self.rewards.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.latents, self.prompts, self.rewards = state["latents"], list(state["prompts"]), state["rewards"]


def group_ids(prompts: list[str]) -> torch.Tensor:
    """One integer per distinct prompt: Bradley–Terry pairs are formed within a prompt."""
    index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    return torch.tensor([index[p] for p in prompts])


class LasroMethod(Method):
    name = "lasro"
    needs_differentiable_reward = False  # the surrogate is what gets differentiated

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c, backend = self.config, self.backend
        if not c.surrogate_timestep < backend.schedule.num_train_timesteps:
            raise UserError(f"--surrogate-timestep {c.surrogate_timestep} must be below the model's "
                            f"{backend.schedule.num_train_timesteps} training timesteps")
        with torch.random.fork_rng(devices=[]):  # the same seed gives the same head; the global RNG is untouched
            torch.manual_seed(derive_seed(c.seed, "surrogate-init"))
            self.surrogate = Surrogate(backend.unet_encoder(c.surrogate_depth), self._surrogate_cond,
                                       timestep=c.surrogate_timestep, width=c.surrogate_width, tune=c.surrogate_tune,
                                       alpha_bar=backend.schedule.alpha_bar(c.surrogate_timestep), base_model=c.model)
        if c.surrogate_init:
            load_surrogate(c.surrogate_init, self.surrogate)
        self.surrogate.to(backend.device)
        self.surrogate_params = self.surrogate.trainable_parameters()
        self.surrogate_optimizer = torch.optim.AdamW(self.surrogate_params, lr=c.surrogate_lr)
        self.buffer = LabelledBuffer(c.buffer_size)
        self.steps_started = 0  # generator (optimiser) steps begun
        self.queries = 0  # true-reward evaluations, exploration and generator samples alike
        self.mean = self.scale = None  # S: running mean and max-deviation of the surrogate values
        self.reference: tuple[float, float, float, float] | None = None  # surrogate/true mean and std, last training
        self.last_round: dict[str, float] = {}

    # ---- validation ----------------------------------------------------------------------------
    def check(self) -> None:
        super().check()
        c = self.config
        steps = c.timestep_list(self.backend.schedule.num_train_timesteps)
        if not any(self.step_weights()):
            names = ["--one-step-weight", "--two-step-weight"][:len(steps)]
            raise UserError(f"every output's weight is 0 ({', '.join(names)}): the generator would learn nothing; give "
                            f"an output a positive weight")
        per_round = c.batch_size * c.samples_per_prompt * len(steps)
        if c.buffer_size < per_round:
            raise UserError(f"--buffer-size {c.buffer_size} cannot hold one surrogate round ({c.batch_size} prompts x "
                            f"{c.samples_per_prompt} samples x {len(steps)} outputs = {per_round}); raise it")
        if Processes.from_environment().world > 1:
            raise UserError("LaSRO trains its surrogate on one process; run it without torchrun/accelerate (several "
                            "processes would each learn their own surrogate)")

    def step_weights(self) -> list[float]:
        c = self.config
        return [c.one_step_weight, c.two_step_weight][:c.sampling_steps]

    # ---- sampling ------------------------------------------------------------------------------
    def timesteps(self) -> list[int]:
        return self.config.timestep_list(self.backend.schedule.num_train_timesteps)

    def rollout(self, prompts: list[str], noise: SamplerNoise):
        c = self.config
        cond = self.backend.encode(prompts, self.size, self.size)
        return cond, few_step_sample(self.backend, cond, noise, self.timesteps(), guidance=c.guidance,
                                     renoise_eta=c.eta, use_checkpoint=c.grad_checkpointing)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> torch.Tensor:
        """The few-step generator's images (the way it trains), for evaluation and previews."""
        _, result = self.rollout(prompts, self.noise(len(prompts), seed, 0))
        return self.backend.decode(result.x0s[-1])

    def _surrogate_cond(self, prompts: list[str], latents: torch.Tensor):
        f = self.backend.vae_scale_factor
        return self.backend.encode(prompts, latents.shape[-2] * f, latents.shape[-1] * f)

    @torch.no_grad()
    def true_reward(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The (black-box) reward of decoded latents, in batches; every sample counts as one query."""
        b = self.config.batch_size
        scores = [self.reward(self.backend.decode(latents[i:i + b].detach()), prompts[i:i + b]).float()
                  for i in range(0, len(latents), b)]
        self.queries += len(latents)
        return torch.cat(scores)

    # ---- the surrogate -------------------------------------------------------------------------
    @contextlib.contextmanager
    def surrogate_frozen(self):
        """The generator's pass: gradient flows through the surrogate to the latents, not into ψ."""
        for p in self.surrogate_params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.surrogate_params:
                p.requires_grad_(True)

    def surrogate_round(self, prompts: list[str], seed: int, train: bool) -> None:
        """Explore, label, measure held-out accuracy, store, and (unless frozen) take Bradley–Terry steps."""
        c = self.config
        n = c.samples_per_prompt
        repeated = [p for p in prompts for _ in range(n)]
        noise = self.noise(len(repeated), derive_seed(seed, "explore"), 0)
        with torch.no_grad():
            _, result = self.rollout(repeated, noise)
            latents = torch.cat(result.x0s)
            scored = repeated * len(result.x0s)
            rewards = self.true_reward(latents, scored)
            groups = group_ids(scored)
            # Held out: the surrogate has not seen these samples yet.
            self.last_round["surrogate_pair_accuracy"] = pair_accuracy(self.surrogate(latents, scored).float().cpu(),
                                                                       rewards.cpu(), groups)
        self.buffer.add(latents, scored, rewards)
        if train and c.surrogate_steps:
            self.last_round["surrogate_loss"] = self.train_surrogate(seed)
        with torch.no_grad():
            values = self.surrogate(latents, scored).float()
        if train or self.reference is None:
            self.reference = (values.mean().item(), values.std().item(), rewards.mean().item(), rewards.std().item())
        if self.mean is None:  # S starts from the spread of the surrogate on these samples
            self.update_normalizer(values, momentum=1.0)

    def train_surrogate(self, seed: int) -> float:
        c, buffer = self.config, self.buffer
        generator = torch.Generator().manual_seed(derive_seed(seed, "surrogate-batches"))
        reward_mean, reward_std = buffer.rewards.mean(), buffer.rewards.std().clamp_min(1e-8)
        losses = []
        for _ in range(c.surrogate_steps):
            index = buffer.grouped_batch(c.surrogate_batch, generator)
            prompts = [buffer.prompts[i] for i in index]
            latents = buffer.latents[index].to(self.backend.device)
            rewards = buffer.rewards[index].to(self.backend.device)
            scores = self.surrogate(latents, prompts).float()
            loss = bradley_terry_loss(scores, rewards, group_ids(prompts).to(scores.device))
            if c.surrogate_regression:
                loss = loss + c.surrogate_regression * F.mse_loss(scores, (rewards - reward_mean) / reward_std)
            self.surrogate_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.surrogate_optimizer.step()
            losses.append(loss.item())
        self.surrogate_optimizer.zero_grad(set_to_none=True)  # free them; the generator's pass must add none
        return sum(losses) / len(losses)

    def update_normalizer(self, values: torch.Tensor, momentum: float) -> None:
        """Running mean and running max-deviation of the surrogate's values (the paper's "running mean / max")."""
        batch_mean = values.mean().item()
        mean = batch_mean if self.mean is None else (1 - momentum) * self.mean + momentum * batch_mean
        deviation = (values - mean).abs().max().item()
        self.mean = mean
        self.scale = deviation if self.scale is None else (1 - momentum) * self.scale + momentum * deviation

    def normalized(self, values: torch.Tensor) -> torch.Tensor:
        clip = self.config.normalizer_clip
        return ((values - self.mean) / max(self.scale, 1e-8)).clamp(-clip, clip)

    # ---- one step ------------------------------------------------------------------------------
    def adapt(self, prompts: list[str], seed: int) -> None:
        """The surrogate's share of this optimiser step: stage-1 rounds first, then one every generator_steps."""
        c, step = self.config, self.steps_started
        train = not (c.freeze_surrogate_after and step >= c.freeze_surrogate_after)
        rounds = (c.surrogate_warmup if step == 0 else 0) + (step % c.generator_steps == 0)
        for k in range(rounds):
            self.surrogate_round(prompts, derive_seed(seed, "lasro-round", k), train)
        self.steps_started += 1

    def loss(self, prompts: list[str], seed: int) -> StepOutput:
        c = self.config
        if self.sample_offset == 0:  # the step's first micro-batch
            self.adapt(prompts, seed)
        cond, result = self.rollout(prompts, self.noise(len(prompts), seed))
        with self.surrogate_frozen():
            values = [self.surrogate(x0, prompts, cond).float() for x0 in result.x0s]
        self.update_normalizer(torch.cat(values).detach(), c.normalizer_momentum)
        loss = -sum(w * self.normalized(v).mean() for w, v in zip(self.step_weights(), values))
        metrics = {}
        if c.base_regularizer:
            regularizer = sum(F.mse_loss(x0, self.base_x0(x, t, cond))
                              for x0, x, t in zip(result.x0s, result.inputs, result.timesteps))
            loss = loss + c.base_regularizer * regularizer
            metrics["base_regularizer"] = regularizer.item()

        latents = torch.cat(result.x0s).detach()
        scored = prompts * len(result.x0s)
        rewards = self.true_reward(latents, scored)
        self.buffer.add(latents, scored, rewards)
        final = rewards[-len(prompts):]
        metrics.update(true_reward=final.mean().item(), surrogate_reward=values[-1].mean().item(),
                       reward_queries=float(self.queries), **self.last_round)
        if len(result.x0s) == 2:
            metrics["true_reward_one_step"] = rewards[:len(prompts)].mean().item()
        if self.reference is not None:  # drift of surrogate vs true reward, in std units of the last training round
            s_mean, s_std, r_mean, r_std = self.reference
            metrics["surrogate_gap"] = ((values[-1].detach().mean().item() - s_mean) / max(s_std, 1e-8)
                                        - (final.mean().item() - r_mean) / max(r_std, 1e-8))
        return StepOutput(loss=loss, rewards=final, metrics=metrics)

    @torch.no_grad()
    def base_x0(self, x: torch.Tensor, t: int, cond) -> torch.Tensor:
        """The base model's x̂0 at the same input (adapter off): the regulariser's target."""
        with only_adapters(self.backend.denoiser, ()):
            out = self.backend.predict(x.detach(), t, cond, self.config.guidance)
        return self.backend.schedule.x0_and_eps(out, x.detach(), t)[0]

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"surrogate": {k: v.detach().cpu().clone() for k, v in self.surrogate.trainable_state().items()},
                "optimizer": self.surrogate_optimizer.state_dict(), "buffer": self.buffer.state_dict(),
                "steps_started": self.steps_started, "queries": self.queries, "normalizer": (self.mean, self.scale),
                "reference": self.reference, "last_round": dict(self.last_round)}

    def load_state_dict(self, state: dict) -> None:
        self.surrogate.load_trainable_state(state["surrogate"], "the checkpoint's surrogate")
        self.surrogate_optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.steps_started, self.queries = state["steps_started"], state["queries"]
        self.mean, self.scale = state["normalizer"]
        self.reference, self.last_round = state["reference"], dict(state["last_round"])

    def save_artifacts(self, out: Path, stem: str) -> list[Path]:
        """The trained surrogate next to the LoRA: `<stem>_surrogate.safetensors` (load it with --surrogate-init)."""
        return [self.surrogate.save(out / f"{stem}_surrogate.safetensors",
                                    {"comfy_rft.steps": str(self.steps_started), "comfy_rft.reward": self.config.reward,
                                     "comfy_rft.reward_queries": str(self.queries)})]

