"""The training loop every method shares: prompts -> method loss -> backward -> clip -> AdamW step.

A method (in trainers/) only says how one micro-batch becomes a loss (`Method.loss`); seeding, the
LoRA, the optimiser, gradient accumulation, metrics, evaluation before/after, the LoRA file and the
plots are done here once.
"""

from __future__ import annotations

import json
import random
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import lora
from .backend import DiffusersBackend
from .config import TrainConfig
from .errors import UserError
from .plots import image_grid, plot_curves
from .rewards import Reward, load_reward
from .sampler import GradPolicy, SamplerNoise, sample
from .seeding import derive_seed


def load_prompts(text_or_file: str) -> list[str]:
    """Prompts from a file (one per line) or from the text itself (one per line)."""
    source = text_or_file
    path = Path(text_or_file).expanduser()
    if "\n" not in text_or_file and len(text_or_file) < 4096 and path.is_file():
        source = path.read_text(encoding="utf-8")
    prompts = [line.strip() for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        where = f"the file {path}" if path.is_file() else "the prompt text"
        raise UserError(f"no prompts: {where} is empty. Give a prompt, or a text file with one prompt per line.")
    return prompts


@dataclass
class StepOutput:
    """One micro-batch's loss to minimise, its rewards (detached) and any method-specific metrics."""

    loss: torch.Tensor
    rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    """The part of a trainer that differs between methods. Subclasses live in trainers/."""

    name = "method"
    needs_differentiable_reward = True

    def __init__(self, config: TrainConfig, backend: DiffusersBackend, reward: Reward):
        self.config, self.backend, self.reward = config, backend, reward
        self.size = config.resolution or backend.resolution
        self.params: list[torch.nn.Parameter] = []  # the trainable adapter, set by the loop

    def check(self) -> None:
        """Method-specific validation against the loaded model and reward (UserError on misuse)."""
        if self.needs_differentiable_reward and not self.reward.differentiable:
            raise UserError(f"the reward {self.reward.name!r} is not differentiable, so {self.name} cannot follow "
                            f"its gradient; use a differentiable reward, or the lasro method, which learns a "
                            f"differentiable surrogate of any reward")

    def loss(self, prompts: list[str], seed: int) -> StepOutput:
        raise NotImplementedError

    def after_backward(self) -> None:
        """Called after each micro-batch's backward, before clipping and the optimiser step (SAM restores θ here)."""

    def noise(self, batch: int, seed: int) -> SamplerNoise:
        shape = self.backend.latent_shape(batch, self.size, self.size)
        return SamplerNoise.from_seed(seed, shape, self.config.sampling_steps, device=self.backend.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Images of the current model (adapter on), without gradient, for evaluation and previews."""
        c = self.config
        cond = self.backend.encode(prompts, self.size, self.size)
        result = sample(self.backend, cond, self.noise(len(prompts), seed), num_steps=c.sampling_steps, eta=c.eta,
                        guidance=c.guidance, policy=GradPolicy("none"))
        return self.backend.decode(result.latents)


@dataclass
class TrainResult:
    method: str
    steps: int
    reward_before: float
    reward_after: float
    lora: str
    seconds: float
    out: str
    interrupted: bool = False
    hub_url: str = ""

    def summary(self) -> dict:
        return dict(self.__dict__)


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def evaluate(method: Method, prompts: list[str], count: int, seed: int, batch_size: int):
    """Mean reward of `count` images for fixed prompts and noises, and the images."""
    eval_prompts = [prompts[i % len(prompts)] for i in range(count)]
    images, rewards = [], []
    for start in range(0, count, batch_size):
        chunk = eval_prompts[start:start + batch_size]
        imgs = method.generate(chunk, derive_seed(seed, "eval", start))
        with torch.no_grad():
            rewards.append(method.reward(imgs, chunk).float().cpu())
        images.append(imgs.cpu())
    return torch.cat(rewards), torch.cat(images)


def add_run_lora(denoiser, config: TrainConfig) -> list[torch.nn.Parameter]:
    """The run's trainable LoRA, initialised from the run's seed: the same seed gives the same start."""
    torch.manual_seed(derive_seed(config.seed, "lora-init"))
    targets = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip())
    peft_init = {"gaussian": "gaussian", "kaiming": True}[config.lora_init]
    return lora.inject_lora(denoiser, config.lora_rank, config.lora_alpha, targets, init=peft_init)


def _file_stem(method: str, reward: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{method}_{reward}").strip("-")


def train(method_cls: type[Method], config: TrainConfig, *, backend: DiffusersBackend | None = None,
          reward: Reward | None = None, on_step: Callable[[dict], bool | None] | None = None,
          progress: bool = True) -> TrainResult:
    """Train a LoRA with `method_cls` and write it, its metrics and plots under `config.out`."""
    start = time.perf_counter()
    config.validate()
    if config.push_to_hub:  # a bad repo id or a missing token should stop the run now, not after training
        from .hub import resolve_token, validate_repo_id

        validate_repo_id(config.push_to_hub)
        resolve_token()
    prompts = load_prompts(config.prompts)
    device = _resolve_device(config.device)
    backend = backend or DiffusersBackend.load(config.model, device=device, model_config=config.model_config or None)
    reward = (reward or load_reward(config.reward)).to(backend.device)
    method = method_cls(config, backend, reward)
    method.check()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    params = method.params = add_run_lora(backend.denoiser, config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)

    eval_seed = derive_seed(config.seed, "evaluation")
    rewards_before, images_before = evaluate(method, prompts, config.eval_samples, eval_seed, config.batch_size)
    order = random.Random(derive_seed(config.seed, "prompts"))
    history: list[dict] = []
    interrupted = False
    metrics_file = (out / "metrics.jsonl").open("w", encoding="utf-8")
    bar = tqdm(range(config.steps), desc=f"{method.name}", disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            t0 = time.perf_counter()
            if backend.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(backend.device)
            optimizer.zero_grad(set_to_none=True)
            step_rewards, extra = [], {}
            for micro in range(config.grad_accum):
                batch = [order.choice(prompts) for _ in range(config.batch_size)]
                output = method.loss(batch, derive_seed(config.seed, "step", step, micro))
                (output.loss / config.grad_accum).backward()
                method.after_backward()
                step_rewards.append(output.rewards.float().cpu())
                for k, v in output.metrics.items():
                    extra[k] = extra.get(k, 0.0) + float(v) / config.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            optimizer.step()
            r = torch.cat(step_rewards)
            row = {"step": step + 1, "reward_mean": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
                   "grad_norm": float(grad_norm), "seconds": time.perf_counter() - t0,
                   "peak_memory_mb": _peak_memory_mb(backend.device), **extra}
            history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(reward=f"{row['reward_mean']:.4f}", grad=f"{row['grad_norm']:.2e}")
            if on_step is not None and on_step(row):
                interrupted = True
                break
    except KeyboardInterrupt:  # keep the work done so far: the LoRA below is still written
        interrupted = True
    finally:
        method.after_backward()  # an interrupted SAM step must not leave the LoRA at θ + ε
        bar.close()
        metrics_file.close()

    rewards_after, images_after = evaluate(method, prompts, config.eval_samples, eval_seed, config.batch_size)
    lora_path = out / f"{_file_stem(method.name, config.reward)}.safetensors"
    metadata = lora.lora_metadata(
        base_model=config.model, architecture=lora.lora_architecture(backend.denoiser), method=method.name,
        reward=config.reward, config={"method": method.name, **config.to_dict()}, rank=config.lora_rank,
        alpha=config.lora_alpha, resolution=method.size, prediction_type=backend.schedule.prediction_type,
        title=lora_path.stem,
    )
    lora.save_lora(lora_path, lora.lora_state_dict(backend.denoiser), metadata)
    image_grid([images_before, images_after], ["before", "after"], out / "before_after.png")
    steps_done = len(history)
    plot_curves({"training reward (batch mean)": ([h["step"] for h in history], [h["reward_mean"] for h in history]),
                 "evaluation reward": ([0, steps_done], [rewards_before.mean().item(), rewards_after.mean().item()])},
                out / "reward_curve.png", title=f"{method.name} on {config.model} — {config.reward}")
    result = TrainResult(method=method.name, steps=steps_done, reward_before=rewards_before.mean().item(),
                         reward_after=rewards_after.mean().item(), lora=str(lora_path),
                         seconds=round(time.perf_counter() - start, 3), out=str(out), interrupted=interrupted)
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2))
    if config.push_to_hub:
        from .hub import push_lora

        try:
            result.hub_url = push_lora(lora_path, config.push_to_hub, samples=[out / "before_after.png"],
                                       reward_curve=out / "reward_curve.png",
                                       config={"method": method.name, **config.to_dict()}, metrics=result.summary())
        except UserError as err:
            raise UserError(f"{err} The run's files are in {out}; push them later with `comfy-rft push "
                            f"{lora_path} --repo {config.push_to_hub}`.") from None
        (out / "summary.json").write_text(json.dumps(result.summary(), indent=2))
    return result
