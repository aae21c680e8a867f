"""Does each method work? Every method trains from the toy world's base model (comfy_rft.toyworld)
with the same budget and seeds, on the hackable proxy reward, and is judged by measures it never sees.

    python bench/evidence.py [--out runs/evidence] [--seeds 0,1,2] [--steps 60] [--fast]

For each arm and seed: `comfy_rft.loop.train` (the library's own loop, nothing special-cased), then
the saved LoRA file is loaded back into a fresh toy model and judged on a fixed set (every caption,
four noises each): proxy reward (`toy-proxy`, what was optimised), gold reward (`toy-gold`, five
classifiers trained on other data with augmentation), the programmatic check (`toy-check`: colour,
shape and size read from the pixels), caption accuracy (the gold ensemble's argmax gets all three
attributes), size (the program's reading: the world prefers big shapes, 0..1 in the data), diversity
(mean same-caption pairwise distance, as the loop's evaluation) and realism (Fréchet distance of
the gold ensemble's features to real renders of the same captions; lower is more realistic), plus
training reward queries and wall-clock seconds of the training steps. Prints a markdown table
(median over seeds) and writes it with results.json and plots under --out. `--fast` is the
test suite's smoke mode: one seed, few steps, DRaFT-1 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfy_rft import lora
from comfy_rft.backend import DiffusersBackend
from comfy_rft.config import build_config
from comfy_rft.evaluation import diversity
from comfy_rft.loop import train
from comfy_rft.rewards import Reward, load_reward
from comfy_rft.seeding import derive_seed
from comfy_rft.toyworld import TOY_MODEL, shapes
from comfy_rft.toyworld.classifier import caption_hits
from comfy_rft.trainers import METHODS

SAMPLING_STEPS, GUIDANCE = 10, 3.0
JUDGE_NOISES = 4  # samples per caption in the judged set
JUDGE_SEED = 7_000_001


@dataclass(frozen=True)
class Arm:
    label: str
    method: str
    overrides: dict = field(default_factory=dict)
    claim: str = ""
    own_sampler: bool = False  # judged with its own few-step sampler (LaSRO), not the shared DDIM


# Equal budgets: the same model, prompts, steps, batch, LoRA, optimiser and sampler for every arm.
SHARED = dict(model=TOY_MODEL, reward="toy-proxy", prompts="\n".join(shapes.all_captions()), batch_size=4,
              lr=3e-3, weight_decay=0.0, lora_rank=4, lora_alpha=4.0, sampling_steps=SAMPLING_STEPS, eta=0.0,
              guidance=GUIDANCE, eval_samples=36, checkpoint_every=0, grad_checkpointing=False)
RSAFT = dict(base="draft-k", k=1, rho=0.5, rho_param=0.05)  # ρ ≈ 2 % of a 32x32 image's L2 norm (§9: 1e-2 x scale)
# LaSRO optimises the program's check, a reward with no gradient, with a 2-step generator (the toy
# model is not distilled: its 2-step samples are its own baseline, judged with the same sampler).
LASRO = dict(reward="toy-check", sampling_steps=2, eta=1.0, lr=1e-3, surrogate_steps=8, surrogate_warmup=8)
ARMS = [
    Arm("DRaFT-1", "draft", dict(k=1), "DRaFT-K with K=1 raises the reward cheaply"),
    Arm("DRaFT-3", "draft", dict(k=3), "K>1 costs more per step and gains little"),
    Arm("DRaFT-LV", "draft", dict(k=1, lv_samples=2), "LV lowers the variance of DRaFT-1's gradient"),
    Arm("RSA-FT", "rsaft", RSAFT, "both perturbations: more gold reward at a matched proxy"),
    Arm("RSA-FT image-only", "rsaft", {**RSAFT, "param_perturbation": False}, "ablation"),
    Arm("RSA-FT SAM-only", "rsaft", {**RSAFT, "image_perturbation": False}, "ablation"),
    Arm("RSA-FT shared-prefix", "rsaft", {**RSAFT, "sam_rollout": "shared-prefix"},
        "SAM pass re-runs only the steps with gradient: the same quality for less time"),
    Arm("RSA-FT small radii", "rsaft", {**RSAFT, "rho": 0.1, "rho_param": 0.01},
        "ρ 0.1, ρ_ω 0.01: both radii a fifth of the RSA-FT arm's"),
    Arm("SQDF", "sqdf", dict(eta=1.0, gamma=0.9, alpha=2.0), "KL keeps it near the base: less hacking"),
    Arm("SQDF α=0.05", "sqdf", dict(eta=1.0, gamma=0.9, alpha=0.05), "the paper's large-scale α"),
    Arm("LaSRO on toy-check", "lasro", LASRO, "a black-box reward, through a learned surrogate", own_sampler=True),
    Arm("LaSRO frozen surrogate", "lasro", {**LASRO, "freeze_surrogate_after": 1},
        "ablation: a surrogate that stops learning gets hacked", own_sampler=True),
]
BASE_FEW_STEP = Arm("base model, 2-step sampler", "lasro", LASRO, own_sampler=True)
FAST_ARMS = [ARMS[0]]


class CountingReward(Reward):
    """Counts the images a reward scores (its queries), passing everything through."""

    def __init__(self, inner: Reward):
        super().__init__()
        self.inner, self.name, self.differentiable = inner, inner.name, inner.differentiable
        self.typical_range, self.queries = inner.typical_range, 0

    def forward(self, images, prompts):
        self.queries += len(images)
        return self.inner(images, prompts)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (as FID, any features)."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).square().sum()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(ca)
    root_a = vectors @ values.clamp_min(0).sqrt().diag() @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp_min(0).sqrt().sum()
    return float(mu + ca.trace() + cb.trace() - 2 * cross)


class Judge:
    """The fixed judged set and the measures; the same for the base model and every trained LoRA."""

    def __init__(self):
        self.prompts = shapes.all_captions() * JUDGE_NOISES
        self.proxy, self.gold = load_reward("toy-proxy"), load_reward("toy-gold")
        generator = torch.Generator().manual_seed(JUDGE_SEED)
        self.labels = shapes.labels(self.prompts)
        real = shapes.render(self.labels, generator)
        with torch.no_grad():
            self.real_features = self.gold.ensemble.features(real)

    @torch.no_grad()
    def __call__(self, arm: Arm, config, lora_file: str | None = None) -> tuple[dict, torch.Tensor]:
        """Measures of the images `Method.generate` makes with the LoRA file: deterministic DDIM (η = 0)
        for every arm that samples with the shared sampler, the arm's own sampler otherwise."""
        backend = DiffusersBackend.load(TOY_MODEL, device="cpu")
        if lora_file:
            lora.load_lora(backend.denoiser, lora_file)
        config = config if arm.own_sampler else dataclasses.replace(config, eta=0.0)
        generator = METHODS[arm.method][1](config, backend, self.proxy)
        images = torch.cat([generator.generate(self.prompts[i:i + 72], derive_seed(JUDGE_SEED, i))
                            for i in range(0, len(self.prompts), 72)])
        match, size = shapes.check(images, self.labels)
        return {
            "proxy": self.proxy(images, self.prompts).mean().item(),
            "gold": self.gold(images, self.prompts).mean().item(),
            "check": shapes.preference(match, size).mean().item(),
            "caption_accuracy": caption_hits(self.gold.ensemble, images, self.labels).float().mean().item(),
            "size": size.mean().item(),
            "diversity": diversity(images, self.prompts),
            "fd_real": frechet_distance(self.gold.ensemble.features(images), self.real_features),
        }, images


def arm_config(arm: Arm, seed: int, steps: int, out: Path):
    return build_config(METHODS[arm.method][0], overrides={**SHARED, **arm.overrides, "steps": steps, "seed": seed,
                                                           "out": str(out)})


def train_arm(arm: Arm, seed: int, steps: int, out: Path) -> dict:
    config = arm_config(arm, seed, steps, out)
    method_cls = METHODS[arm.method][1]
    reward = CountingReward(load_reward(config.reward))
    evaluations = 2 + (steps // config.eval_every if config.eval_every else 0)
    result = train(method_cls, config, reward=reward, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    return {"lora": result.lora, "train_seconds": sum(r["seconds"] for r in train_rows),
            "reward_queries": reward.queries - evaluations * config.eval_samples,
            "proxy_curve": [r["reward_mean"] for r in train_rows]}


def median_row(label: str, runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {"arm": label, "seeds": len(runs), **{k: statistics.median(r[k] for r in runs) for k in keys}}


COLUMNS = [("arm", "arm", "{}"), ("proxy", "proxy ↑ (optimised)", "{:.3f}"), ("gold", "gold ↑", "{:.3f}"),
           ("check", "check ↑", "{:.3f}"), ("caption_accuracy", "caption acc. ↑", "{:.3f}"), ("size", "size", "{:.2f}"),
           ("diversity", "diversity", "{:.2f}"), ("fd_real", "FD to real ↓", "{:.2f}"),
           ("reward_queries", "reward queries", "{:.0f}"), ("train_seconds", "train s", "{:.0f}")]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) if key in row else "–" for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = results["base"]
    left.scatter([base["proxy"]], [base["gold"]], marker="*", s=160, color="black", label="base", zorder=3)
    for label, runs in results["arms"].items():
        points = left.scatter([r["proxy"] for r in runs], [r["gold"] for r in runs], label=label, alpha=0.8)
        curve = torch.tensor([r["proxy_curve"] for r in runs]).median(0).values
        smooth = torch.nn.functional.avg_pool1d(curve.view(1, 1, -1), 5, 1, 2, count_include_pad=False).view(-1)
        right.plot(range(1, len(curve) + 1), smooth, label=label, color=points.get_facecolor()[0])
    lo = min(base["proxy"], base["gold"]) - 0.02
    left.plot([lo, 1], [lo, 1], ls=":", color="grey", lw=1)
    left.set(xlabel="proxy reward (optimised)", ylabel="gold reward (held out)", title="gold vs proxy, per seed")
    right.set(xlabel="optimiser step", ylabel="proxy reward (batch mean, smoothed)", title="training curves")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, seeds: list[int], steps: int, arms: list[Arm]) -> dict:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    judge = Judge()
    base, base_images = judge(ARMS[0], arm_config(ARMS[0], 0, steps, out))
    bases = {"base model": base}
    if any(a.own_sampler for a in arms):
        bases[BASE_FEW_STEP.label] = judge(BASE_FEW_STEP, arm_config(BASE_FEW_STEP, 0, steps, out))[0]
    results = {"steps": steps, "seeds": seeds, "shared": {k: v for k, v in SHARED.items() if k != "prompts"},
               "base": base, "arms": {}}
    grids, grid_labels = [base_images[:12]], ["base"]
    for arm in arms:
        runs = []
        for seed in seeds:
            run_dir = out / "runs" / f"{arm.label.replace(' ', '_')}-seed{seed}"
            trained = train_arm(arm, seed, steps, run_dir)
            judged, images = judge(arm, arm_config(arm, seed, steps, run_dir), trained["lora"])
            runs.append({**judged, **trained})
            print(f"{arm.label} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in judged.items()), flush=True)
        results["arms"][arm.label] = runs
        grids.append(images[:12])
        grid_labels.append(arm.label)
    results["bases"] = bases
    rows = [{"arm": label, "seeds": 0, **b} for label, b in bases.items()]
    rows += [median_row(a, r) for a, r in results["arms"].items()]
    results["table"] = rows
    results["seconds"] = round(time.perf_counter() - started, 1)
    table = markdown(rows)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "evidence.png")
    from comfy_rft.plots import image_grid

    image_grid(grids, grid_labels, out / "samples.png", min_cell=64)
    print(table)
    print(f"total {results['seconds']:.0f} s; files in {out}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/evidence")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds; the table shows medians.")
    parser.add_argument("--steps", type=int, default=60, help="Optimiser steps per run (every arm the same).")
    parser.add_argument("--fast", action="store_true", help="Smoke mode: DRaFT-1 only, one seed, 12 steps.")
    parser.add_argument("--arms", default="", help="Comma-separated arm labels to run (default: all).")
    args = parser.parse_args(argv)
    if args.fast:
        run(Path(args.out), [0], 12, FAST_ARMS)
    else:
        wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
        arms = [a for a in ARMS if not wanted or a.label in wanted]
        run(Path(args.out), [int(s) for s in args.seeds.split(",")], args.steps, arms)


if __name__ == "__main__":
    sys.exit(main())
