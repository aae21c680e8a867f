"""Evaluation on a fixed, seeded set: the training reward, held-out ("gold") rewards, diversity, a grid.

Reward hacking is only visible from rewards the run does not optimise and from diversity, so
every method evaluates the same way, before training, every `eval_every` steps and at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F

from .seeding import derive_seed


@dataclass
class Evaluation:
    reward: float
    held_out: dict[str, float] = field(default_factory=dict)
    diversity: float = float("nan")
    images: torch.Tensor | None = None

    def row(self, step: int) -> dict:
        """A metrics.jsonl row (diversity is null when no prompt has two images)."""
        return {"step": step, "kind": "eval", "eval_reward": self.reward,
                "diversity": None if self.diversity != self.diversity else self.diversity,
                **{f"eval_{name}": value for name, value in self.held_out.items()}}


def diversity(images: torch.Tensor, prompts: list[str], size: int = 16) -> float:
    """Mean pairwise L2 distance between images of the same prompt, on 16×16 average-pooled pixels
    (a model-free feature: small images of one prompt that all look alike score near 0)."""
    features = F.adaptive_avg_pool2d(images.float(), size).flatten(1)
    distances = []
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        distances += [(features[a] - features[b]).norm().item() for a, b in combinations(rows, 2)]
    return sum(distances) / len(distances) if distances else float("nan")


@torch.no_grad()
def evaluate(method, prompts: list[str], count: int, seed: int, batch_size: int,
             held_out: dict | None = None) -> Evaluation:
    """Score `count` images (prompts cycled, fixed noises) with the training reward and each held-out reward."""
    eval_prompts = [prompts[i % len(prompts)] for i in range(count)]
    images = torch.cat([method.generate(eval_prompts[s:s + batch_size], derive_seed(seed, "eval", s)).cpu()
                        for s in range(0, count, batch_size)])

    def score(reward) -> float:
        device = method.backend.device
        return torch.cat([reward(images[s:s + batch_size].to(device), eval_prompts[s:s + batch_size]).float().cpu()
                          for s in range(0, count, batch_size)]).mean().item()

    return Evaluation(reward=score(method.reward), held_out={n: score(r) for n, r in (held_out or {}).items()},
                      diversity=diversity(images, eval_prompts), images=images)
