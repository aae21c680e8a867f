"""`comfy-rft` command line: train, demo.

The one module of the engine that imports trainers/ (it is a face, like nodes/). Every training
command prints, as its last stdout line, one JSON object: method, steps, reward_before,
reward_after, lora, seconds (and the output folder).
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import add_config_arguments, build_config
from .errors import UserError

DEMO_PROMPTS = "a red circle\na blue square\na green triangle\na yellow star"


def _methods():
    from comfy_rft.trainers import METHODS

    return METHODS


def _run_training(method_name: str, config) -> int:
    from .loop import train

    config_cls, method_cls = _methods()[method_name]
    result = train(method_cls, config)
    print(json.dumps(result.summary()), flush=True)
    return 130 if result.interrupted else 0


def cmd_train(argv: list[str]) -> int:
    methods = _methods()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    method = known.method
    if method is None and known.config:
        import tomllib
        from pathlib import Path

        try:
            method = tomllib.loads(Path(known.config).read_text()).get("method")
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise UserError(f"cannot read config file {known.config}: {err}") from None
    method = method or "draft"
    if method not in methods:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(methods)}")
    config_cls, _ = methods[method]
    parser = argparse.ArgumentParser(prog="comfy-rft train", description=f"Train a LoRA with {method}.")
    parser.add_argument("--method", choices=sorted(methods), default=method, help="Fine-tuning method.")
    parser.add_argument("--config", help="A TOML file with any of the options below (flags override it).")
    add_config_arguments(parser, config_cls)
    args = parser.parse_args(argv)
    config = build_config(config_cls, args.config, vars(args))
    return _run_training(method, config)


def cmd_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="comfy-rft demo",
        description="DRaFT-K on the embedded tiny model with the built-in brightness reward: writes the LoRA, "
                    "a before/after grid and a reward curve. Needs no download and no GPU.")
    parser.add_argument("--out", default="comfy-rft-demo", help="Output folder.")
    parser.add_argument("--steps", type=int, default=60, help="Optimiser steps.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    from comfy_rft.trainers import DraftConfig

    # The tiny model's layers are too small to gain from threads; on a busy 2-core machine extra
    # threads make steps stall for seconds.
    torch.set_num_threads(1)
    config = build_config(DraftConfig, overrides=dict(
        model="tiny-sd15", reward="brightness", prompts=DEMO_PROMPTS, steps=args.steps, seed=args.seed,
        out=args.out, k=2, sampling_steps=4, guidance=3.0, lr=1e-2, batch_size=2, eval_samples=8))
    return _run_training("draft", config)


COMMANDS = {"train": cmd_train, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: comfy-rft {" + ",".join(COMMANDS) + "} [options]   (comfy-rft COMMAND --help for details)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UserError as err:
        print(f"comfy-rft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
