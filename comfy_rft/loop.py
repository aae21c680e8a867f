"""The training loop every method shares: prompts -> method loss -> backward -> clip -> AdamW step.

A method (in trainers/) only says how one micro-batch becomes a loss (`Method.loss`); seeding, the
LoRA, the optimiser, gradient accumulation, metrics, evaluation before/after, the LoRA file and the
plots are done here once.
"""

from __future__ import annotations

import contextlib
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
from .checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import Processes
from .errors import UserError
from .evaluation import Evaluation, evaluate
from .metrics_log import MetricsLog
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
        # Index of this micro-batch's first sample in the step's global batch (all micro-batches, all
        # processes): each sample's noise is keyed by it, so the split does not change the update.
        self.sample_offset = 0

    def check(self) -> None:
        """Method-specific validation against the loaded model and reward (UserError on misuse)."""
        if self.needs_differentiable_reward and not self.reward.differentiable:
            raise UserError(f"the reward {self.reward.name!r} is not differentiable, so {self.name} cannot follow "
                            f"its gradient; use a differentiable reward, or the lasro method, which learns a "
                            f"differentiable surrogate of any reward")

    def before_step(self, global_batch: list[str], seed: int, procs: Processes) -> None:
        """Called once per optimiser step, before its micro-batches, with the step's whole global batch (the
        same list and seed on every process): work that is not per micro-batch, such as SQDF's rollout epoch
        into its replay buffer. Nothing by default."""

    def loss(self, prompts: list[str], seed: int) -> StepOutput:
        raise NotImplementedError

    def after_backward(self) -> None:
        """Called after each micro-batch's backward, before clipping and the optimiser step (SAM restores θ here)."""

    def save_artifacts(self, out: Path, stem: str) -> list[Path]:
        """Write the method's own files next to the LoRA (`stem` is the LoRA file's) at the end of a run, e.g.
        LaSRO's surrogate; returns their paths. None by default."""
        return []

    def state_dict(self) -> dict:
        """The method's own state for checkpoints (replay buffers, surrogate models); none by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def noise(self, batch: int, seed: int, first_index: int | None = None) -> SamplerNoise:
        shape = self.backend.latent_shape(batch, self.size, self.size)
        first = self.sample_offset if first_index is None else first_index
        return SamplerNoise.from_seed(seed, shape, self.config.sampling_steps, device=self.backend.device,
                                      first_index=first)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Images of the current model (adapter on), without gradient, for evaluation and previews."""
        c = self.config
        cond = self.backend.encode(prompts, self.size, self.size)
        result = sample(self.backend, cond, self.noise(len(prompts), seed, 0), num_steps=c.sampling_steps, eta=c.eta,
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


def add_run_lora(denoiser, config: TrainConfig) -> list[torch.nn.Parameter]:
    """The run's trainable LoRA, initialised from the run's seed: the same seed gives the same start."""
    torch.manual_seed(derive_seed(config.seed, "lora-init"))
    targets = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip())
    peft_init = {"gaussian": "gaussian", "kaiming": True}[config.lora_init]
    return lora.inject_lora(denoiser, config.lora_rank, config.lora_alpha, targets, init=peft_init)


def _eval_dir(out: Path) -> Path:
    (out / "eval").mkdir(exist_ok=True)
    return out / "eval"


def _file_stem(method: str, reward: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{method}_{reward}").strip("-")


def _optimizer(config: TrainConfig, params):
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                            "or use --optimizer adamw") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _autocast(config: TrainConfig, device: torch.device):
    if config.mixed_precision == "no":
        return contextlib.nullcontext()
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError("--mixed-precision fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16)


def _split_specs(text: str) -> list[str]:
    from .rewards.registry import _split_top_level

    return [s for s in _split_top_level(text, ",") if s] if text.strip() else []


def step_gradients(method: Method, global_batch: list[str], step_seed: int, procs: Processes):
    """Accumulate into `.grad` the gradient of one optimiser step over the step's global batch.

    `method.before_step` sees the whole global batch first; then each micro-batch's `method.loss`.

    The global batch (micro-batches x processes x batch size) is cut by sample index: micro-batch m
    of process r renders samples (m*world + r)*b ... +b, each with the noise of its own index. So
    batch 2b, batch b x 2 accumulation and 2 processes x batch b give the same gradient.
    Returns this process's rewards and the metrics averaged over its micro-batches.
    """
    config = method.config
    b, accum = config.batch_size, config.grad_accum
    with _autocast(config, method.backend.device):
        method.before_step(global_batch, step_seed, procs)
    rewards, metrics = [], {}
    for micro in range(accum):
        method.sample_offset = (micro * procs.world + procs.rank) * b
        with _autocast(config, method.backend.device):
            output = method.loss(global_batch[method.sample_offset:method.sample_offset + b], step_seed)
        (output.loss / accum).backward()
        method.after_backward()
        rewards.append(output.rewards.float().cpu())
        for k, v in output.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / accum
    procs.average_gradients(method.params)
    return torch.cat(rewards), metrics


def train(method_cls: type[Method], config: TrainConfig, *, backend: DiffusersBackend | None = None,
          reward: Reward | None = None, on_step: Callable[[dict], bool | None] | None = None,
          progress: bool = True) -> TrainResult:
    """Train a LoRA with `method_cls` and write it, checkpoints, metrics and plots under `config.out`.

    `on_step(row)` is called after every step; returning True stops the run like Cancel (a
    checkpoint and the LoRA are still written).
    """
    start = time.perf_counter()
    config.validate()
    procs = Processes.from_environment()
    if config.push_to_hub:  # a bad repo id or a missing token should stop the run now, not after training
        from .hub import resolve_token, validate_repo_id

        validate_repo_id(config.push_to_hub)
        resolve_token()
    prompts = load_prompts(config.prompts)
    eval_prompts = load_prompts(config.eval_prompts) if config.eval_prompts else prompts
    device = procs.device(_resolve_device(config.device))
    backend = backend or DiffusersBackend.load(config.model, device=device, model_config=config.model_config or None)
    reward = (reward or load_reward(config.reward)).to(backend.device)
    held_out = {spec: load_reward(spec).to(backend.device) for spec in _split_specs(config.eval_rewards)}
    method = method_cls(config, backend, reward)
    method.check()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run_config = {"method": method.name, **config.to_dict()}

    params = method.params = add_run_lora(backend.denoiser, config)
    optimizer = _optimizer(config, params)
    warmup = config.lr_warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    order = random.Random(derive_seed(config.seed, "prompts"))
    eval_seed = derive_seed(config.seed, "evaluation")

    def run_evaluation() -> Evaluation:
        return evaluate(method, eval_prompts, config.eval_samples, eval_seed, config.batch_size, held_out)

    if config.resume:
        state = load_checkpoint(find_checkpoint(out, config.resume), run_config)
        with torch.no_grad():
            for p, saved in zip(params, state["lora"]):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        order.setstate(state["prompt_order"])
        method.load_state_dict(state["method"])
        history, evaluations, before = state["history"], state["evaluations"], state["before"]
    else:
        before = run_evaluation()
        history, evaluations = [], [before.row(0)]
    first_step = len(history)
    log = MetricsLog(out, config.log_to, run_config, resume_step=first_step) if procs.is_main else None
    if log is not None and not config.resume:
        log.write(evaluations[0])

    def checkpoint() -> None:
        if procs.is_main:
            save_checkpoint(out, len(history), {
                "config": run_config, "lora": [p.detach().cpu().clone() for p in params],
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": rng_state(),
                "prompt_order": order.getstate(), "method": method.state_dict(), "history": history,
                "evaluations": evaluations, "before": before}, keep=config.keep_checkpoints)

    interrupted = False
    b, accum = config.batch_size, config.grad_accum
    bar = tqdm(range(first_step, config.steps), desc=method.name, disable=not progress or not procs.is_main,
               dynamic_ncols=True, initial=first_step, total=config.steps)
    try:
        for step in bar:
            t0 = time.perf_counter()
            if backend.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(backend.device)
            optimizer.zero_grad(set_to_none=True)
            global_batch = [order.choice(prompts) for _ in range(b * accum * procs.world)]
            rewards, extra = step_gradients(method, global_batch, derive_seed(config.seed, "step", step), procs)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            optimizer.step()
            schedule.step()
            r = procs.gather(rewards)
            row = {"step": step + 1, "kind": "train", "reward_mean": r.mean().item(),
                   "reward_std": r.std().item() if len(r) > 1 else 0.0,
                   "grad_norm": float(grad_norm), "lr": schedule.get_last_lr()[0],
                   "seconds": time.perf_counter() - t0, "peak_memory_mb": _peak_memory_mb(backend.device), **extra}
            history.append(row)
            if log is not None:
                log.write(row)
            if config.eval_every and (step + 1) % config.eval_every == 0 and procs.is_main:
                evaluation = run_evaluation()
                evaluations.append(evaluation.row(step + 1))
                log.write(evaluations[-1])
                image_grid([evaluation.images], [f"step {step + 1}"], _eval_dir(out) / f"step-{step + 1:07d}.png")
            bar.set_postfix(reward=f"{row['reward_mean']:.4f}", grad=f"{row['grad_norm']:.2e}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                checkpoint()
            if on_step is not None and on_step(row):
                interrupted = True
                break
    except KeyboardInterrupt:  # keep the work done so far: a checkpoint and the LoRA below are still written
        interrupted = True
    finally:
        method.after_backward()  # an interrupted SAM step must not leave the LoRA at θ + ε
        bar.close()
    if not (out / "checkpoints" / f"step-{len(history):07d}.pt").exists():
        checkpoint()  # the end, or where Cancel / Ctrl-C stopped
    procs.barrier()
    if not procs.is_main:
        return TrainResult(method=method.name, steps=len(history), reward_before=before.reward, reward_after=float("nan"),
                           lora="", seconds=round(time.perf_counter() - start, 3), out=str(out), interrupted=interrupted)

    after = run_evaluation()
    evaluations.append(after.row(len(history)))
    log.write(evaluations[-1])
    log.close()
    lora_path = out / f"{_file_stem(method.name, config.reward)}.safetensors"
    metadata = lora.lora_metadata(
        base_model=config.model, architecture=lora.lora_architecture(backend.denoiser), method=method.name,
        reward=config.reward, config=run_config, rank=config.lora_rank,
        alpha=config.lora_alpha, resolution=method.size, prediction_type=backend.schedule.prediction_type,
        title=lora_path.stem,
    )
    lora.save_lora(lora_path, lora.lora_state_dict(backend.denoiser), metadata)
    method.save_artifacts(out, lora_path.stem)
    image_grid([before.images, after.images], ["before", "after"], out / "before_after.png")
    steps_done = len(history)
    curves = {"training reward (batch mean)": ([h["step"] for h in history], [h["reward_mean"] for h in history])}
    for key, label in [("eval_reward", "evaluation reward"), *[(f"eval_{n}", f"held-out: {n}") for n in held_out]]:
        curves[label] = ([e["step"] for e in evaluations], [e[key] for e in evaluations])
    plot_curves(curves, out / "reward_curve.png", title=f"{method.name} on {config.model} — {config.reward}")
    result = TrainResult(method=method.name, steps=steps_done, reward_before=before.reward,
                         reward_after=after.reward, lora=str(lora_path),
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
