"""Config dataclasses as the single source of truth for CLI flags, TOML keys and node widgets.

A field declared with `option(default, help, min=…, max=…, choices=…)` becomes `--name-with-dashes`
on the command line, `name` in a TOML file, and (in nodes/) a widget with that tooltip, so the three
never drift apart. `TrainConfig` holds what every method shares; each method subclasses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           choices: tuple | None = None):
    """A config field with its help text and bounds (checked by `validate`)."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices})


def config_fields(cls) -> list[tuple[dataclasses.Field, type]]:
    """(field, resolved type) for every option of a config class."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Options every method shares: the model, the reward, the prompts, the LoRA, the optimiser, the sampler."""

    model: str = option("tiny-sd15", "A local diffusers folder, a single-file checkpoint, or an embedded "
                        "model: toy-shapes (the toy world's shapes model), tiny-sd15, tiny-sdxl (test-sized SD shapes).")
    model_config: str = option("", "For a single-file checkpoint: a local diffusers folder of the same "
                               "architecture whose configs diffusers should use (it cannot fetch them offline).")
    reward: str = option("brightness", "The reward to maximise (see `comfy-rft rewards`).")
    prompts: str = option("a photo of a cat", "A text file with one prompt per line, or the prompt text itself "
                          "(several prompts separated by newlines).")
    steps: int = option(100, "Optimiser steps.", min=1)
    seed: int = option(0, "Seed for the LoRA init, prompt order and every sampler noise: the same seed and "
                       "options give the same LoRA, bit for bit, on the same machine.", min=0)
    out: str = option("runs/latest", "Output folder: LoRA file, metrics.jsonl, plots.")
    batch_size: int = option(2, "Prompts per micro-batch.", min=1)
    grad_accum: int = option(1, "Micro-batches per optimiser step (gradient accumulation).", min=1)
    lr: float = option(4e-4, "AdamW learning rate.", min=0.0)
    weight_decay: float = option(0.1, "AdamW weight decay.", min=0.0)
    adam_beta1: float = option(0.9, "AdamW β1.", min=0.0, max=1.0)
    adam_beta2: float = option(0.999, "AdamW β2.", min=0.0, max=1.0)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0 disables clipping).", min=0.0)
    lora_rank: int = option(8, "LoRA rank r.", min=1)
    lora_alpha: float = option(8.0, "LoRA alpha; the update is scaled by alpha / rank and alpha is stored "
                               "in the file.", min=1e-8)
    lora_targets: str = option("to_q,to_k,to_v,to_out.0", "Comma-separated denoiser module names that get "
                               "a LoRA (attention projections by default).")
    lora_init: str = option("gaussian", "LoRA init of A (B starts at zero either way, so training starts at the "
                            "base model): 'gaussian' (N(0, 1/r)) or 'kaiming' (peft's default).",
                            choices=("gaussian", "kaiming"))
    sampling_steps: int = option(50, "DDIM steps per rollout.", min=1)
    eta: float = option(0.0, "DDIM η: 0 is deterministic DDIM, 1 is DDPM-like.", min=0.0, max=1.0)
    guidance: float = option(7.5, "Classifier-free guidance scale (1 disables CFG).", min=1.0)
    resolution: int = option(0, "Image size in pixels (0: the model's native size).", min=0)
    grad_checkpointing: bool = option(True, "Recompute each denoiser call and the VAE decode in backward: "
                                      "activation memory stays flat in the number of sampling steps and grows "
                                      "only slowly (the autograd graph) with the number of gradient steps.")
    eval_samples: int = option(4, "Images (fixed prompts and seeds, prompts cycled) scored before, during and "
                               "after training; use at least twice the number of prompts for the diversity score.",
                               min=1)
    eval_every: int = option(0, "Evaluate every N steps (0: only before and after training).", min=0)
    eval_prompts: str = option("", "Held-out prompts for evaluation (a file or text, like --prompts); empty: the "
                               "training prompts.")
    eval_rewards: str = option("", "Held-out rewards the run does not optimise, comma-separated specs (e.g. "
                               "pickscore,imagereward): logged at every evaluation to expose reward hacking.")
    checkpoint_every: int = option(100, "Write a resumable checkpoint every N steps (0: only at the end and on "
                                   "interrupt).", min=0)
    keep_checkpoints: int = option(3, "How many checkpoints to keep (the newest).", min=1)
    resume: str = option("", "Continue a run: 'latest' (the newest checkpoint in --out) or a checkpoint file. "
                         "The options must match the run's (steps may grow).")
    log_to: str = option("", "Extra metric sinks besides metrics.jsonl: tensorboard, wandb (comma-separated).")
    mixed_precision: str = option("no", "Autocast the rollout and reward in bf16 or fp16 (LoRA weights and the "
                                  "optimiser stay fp32). fp16 needs CUDA.", choices=("no", "bf16", "fp16"))
    optimizer: str = option("adamw", "adamw, or adamw8bit (bitsandbytes' 8-bit AdamW; needs bitsandbytes).",
                            choices=("adamw", "adamw8bit"))
    lr_warmup_steps: int = option(0, "Linear learning-rate warm-up over the first N steps, then constant.", min=0)
    device: str = option("auto", "cpu, cuda, cuda:N or auto.")
    push_to_hub: str = option("", "After training, publish the LoRA, its before/after samples and a model card to "
                              "this Hugging Face Hub repo (user/name), in one commit; empty: don't push. The token "
                              "comes from HF_TOKEN or `hf auth login`, never from an option.")

    def validate(self) -> None:
        """Check every bound and choice; raise UserError naming the option and the fix."""
        for f, _ in config_fields(type(self)):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("min") is not None and value < meta["min"]:
                raise UserError(f"{flag(f.name)} must be >= {meta['min']} (got {value}): {meta['help']}")
            if meta.get("max") is not None and value > meta["max"]:
                raise UserError(f"{flag(f.name)} must be <= {meta['max']} (got {value}): {meta['help']}")
            if meta.get("choices") and value not in meta["choices"]:
                raise UserError(f"{flag(f.name)} must be one of {', '.join(meta['choices'])} (got {value!r})")
        if not self.lora_targets.strip():
            raise UserError("--lora-targets is empty: name at least one denoiser module, e.g. to_q,to_k,to_v,to_out.0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per option; defaults stay None so TOML values are only overridden by flags actually given."""
    for f, typ in config_fields(cls):
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if typ is bool:
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag(f.name), dest=f.name, type=typ, default=None, help=help_text,
                                choices=f.metadata.get("choices"))


def build_config(cls, toml_path: str | None = None, overrides: dict[str, Any] | None = None):
    """Defaults, then the TOML file, then explicit overrides (CLI flags); validated."""
    values: dict[str, Any] = {}
    known = {f.name: typ for f, typ in config_fields(cls)}
    if toml_path:
        path = Path(toml_path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"config file {path} is not valid TOML: {err}") from None
        data.pop("method", None)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"unknown key(s) in {path}: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        values.update(data)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in known})
    for name, value in values.items():
        typ = known[name]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, typ):
            raise UserError(f"option {name} must be {typ.__name__}, got {value!r}")
    config = cls(**values)
    config.validate()
    return config
