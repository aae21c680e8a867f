"""`comfy-rft` command line: train, demo, score, rewards.

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

DEMO_PROMPTS = ("a red circle on a blue background\na blue square on a yellow background\n"
                "a green triangle on a red background\na yellow circle on a green background")


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
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core). "
                        "On a small or busy CPU machine 1 can be several times faster: extra threads stall.")
    add_config_arguments(parser, config_cls)
    args = parser.parse_args(argv)
    config = build_config(config_cls, args.config, vars(args))
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1 (got {args.threads}); leave it out for torch's default")
        import torch

        torch.set_num_threads(args.threads)
    return _run_training(method, config)


def cmd_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="comfy-rft demo",
        description="DRaFT-K on the toy world's shapes model (toy-shapes) with its caption-matching proxy reward "
                    "(toy-proxy), judged also by held-out measures (toy-gold, toy-check): writes the LoRA, a "
                    "before/after grid and a reward curve. Needs no download and no GPU.")
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
        model="toy-shapes", reward="toy-proxy", eval_rewards="toy-gold,toy-check", prompts=DEMO_PROMPTS,
        steps=args.steps, seed=args.seed, out=args.out, k=2, sampling_steps=10, guidance=3.0, lr=3e-3,
        weight_decay=0.0, lora_rank=4, lora_alpha=4.0, batch_size=4, eval_samples=16, grad_checkpointing=False))
    return _run_training("draft", config)


def _load_images(paths: list[str]):
    import torch
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                array = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
                images.append(array.view(img.height, img.width, 3).permute(2, 0, 1).float().div(255).unsqueeze(0))
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"cannot read image {path}: {err}") from None
    return images


def cmd_score(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="comfy-rft score", description="Score images with a reward spec.")
    parser.add_argument("--reward", required=True, help="Reward spec, e.g. aesthetic or brightness@0.5+jpeg@0.5.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", default="", help="One prompt for every image.")
    group.add_argument("--prompts", help="A text file with one prompt per image (or a single line for all).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("images", nargs="+", help="Image files (PNG, JPEG, ...).")
    args = parser.parse_args(argv)
    import torch

    from .loop import load_prompts
    from .rewards import load_reward

    prompts = load_prompts(args.prompts) if args.prompts else [args.prompt]
    if len(prompts) not in (1, len(args.images)):
        raise UserError(f"{args.prompts} has {len(prompts)} prompts for {len(args.images)} images; give one prompt "
                        f"per image, or one for all")
    prompts = prompts * len(args.images) if len(prompts) == 1 else prompts
    reward = load_reward(args.reward).to(args.device)
    parts = list(getattr(reward, "parts", []))
    rows = []
    for path, image, prompt in zip(args.images, _load_images(args.images), prompts):
        image = image.to(args.device)
        with torch.set_grad_enabled(False):
            if parts:  # a weighted sum: show each term, and add them up rather than scoring twice
                row = {part.name: part(image, [prompt]).item() for part in parts}
                score = sum(w * row[part.name] for part, w in zip(parts, reward.weights))
            else:
                row, score = {}, reward(image, [prompt]).item()
        row = {"image": path, "prompt": prompt, "score": score, **row}
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        columns = ["image", "score", *[p.name for p in parts], "prompt"]
        print("\t".join(columns))
        for row in rows:
            print("\t".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    return 0


def cmd_rewards(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="comfy-rft rewards", description="List the built-in rewards.").parse_args(argv)
    from .rewards import registry

    print("Built-in rewards (use in --reward; combine as name@weight+name@weight):\n")
    for name, builtin in sorted(registry.BUILTINS.items()):
        kind = "differentiable" if builtin.differentiable else "not differentiable (LaSRO only)"
        print(f"  {name:24s} {builtin.summary}\n  {'':24s} {kind}; files: {builtin.files}\n")
    print("Your own reward: module:function(differentiable=true|false), called as fn(images [B,3,H,W] in [0,1], "
          "prompts).")
    print("Options for any term: target=T (score -|r-T|), normalize=prompt, rho=R with robust=adversarial|smooth "
          "and samples=N (perturbation-robust gradient).")
    print("Files are found in: an explicit option path, ComfyUI's models/rewards ($COMFYUI_DIR), "
          "$COMFY_RFT_REWARDS_DIR, the local Hugging Face cache. Nothing is downloaded.")
    return 0


def cmd_push(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="comfy-rft push",
        description="Publish a LoRA file to the Hugging Face Hub with its sample images and a model card built "
                    "from the file's metadata, in one commit (the repo is created if missing). The token comes "
                    "from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.")
    parser.add_argument("lora", metavar="LORA_FILE", help="A .safetensors LoRA written by comfy-rft (or any kohya LoRA).")
    parser.add_argument("--repo", required=True, help="Hub repo id, user/name or org/name.")
    parser.add_argument("--private", action="store_true", help="Create the repo private (an existing repo keeps "
                        "its visibility).")
    parser.add_argument("--samples", metavar="DIR", help="A folder of sample images for the card's gallery "
                        "(default: before_after.png and reward_curve.png next to the LoRA file, if there).")
    parser.add_argument("--revision", metavar="BRANCH", help="Commit to this branch (created from main if missing).")
    parser.add_argument("--base-model", help="Hub id of the base model for the card (default: the one in the file, "
                        "or the reference model of its architecture when it was trained on a local model).")
    parser.add_argument("--license", help="License id for the card (default: the base model family's license).")
    parser.add_argument("--message", help="Commit message.")
    args = parser.parse_args(argv)
    from .hub import push_lora, run_files, sample_images

    samples, curve, metrics = run_files(args.lora)
    if args.samples:
        samples, curve = sample_images(args.samples)
    url = push_lora(args.lora, args.repo, samples=samples, reward_curve=curve, metrics=metrics, private=args.private,
                    revision=args.revision, base_model=args.base_model, license=args.license,
                    commit_message=args.message)
    print(url, flush=True)
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "score": cmd_score, "rewards": cmd_rewards, "push": cmd_push}


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
