"""Reward transforms: weighted sums, per-prompt normalisation, the target form |r − target|."""

from __future__ import annotations

from collections import defaultdict, deque

import torch

from .base import Reward


class WeightedSum(Reward):
    """Σ wᵢ·rᵢ: differentiable only when every part is."""

    def __init__(self, rewards: list[Reward], weights: list[float]):
        super().__init__()
        self.parts = torch.nn.ModuleList(rewards)
        self.weights = [float(w) for w in weights]
        self.name = "+".join(f"{r.name}@{w:g}" for r, w in zip(rewards, self.weights))
        self.differentiable = all(r.differentiable for r in rewards)
        lows, highs = zip(*(sorted((w * r.typical_range[0], w * r.typical_range[1]))
                            for r, w in zip(rewards, self.weights)))
        self.typical_range = (sum(lows), sum(highs))

    def forward(self, images, prompts):
        return sum(w * r(images, prompts) for r, w in zip(self.parts, self.weights))


class Target(Reward):
    """−|r − target| (AlignProp's form): the best score is exactly `target`, overshooting is penalised."""

    def __init__(self, reward: Reward, target: float):
        super().__init__()
        self.inner, self.target = reward, float(target)
        self.name = f"{reward.name}(target={self.target:g})"
        self.differentiable = reward.differentiable
        low, high = reward.typical_range
        self.typical_range = (-max(abs(low - self.target), abs(high - self.target)), 0.0)

    def forward(self, images, prompts):
        return -(self.inner(images, prompts) - self.target).abs()


class PerPromptNormalized(Reward):
    """(r − mean_p)/std_p with running statistics of the last `window` scores of each prompt p.

    As DDPO's PerPromptStatTracker: until a prompt has `min_count` scores, the statistics of all
    prompts are used. Statistics are updated from every scored batch (detached, so they are constants
    for the gradient).
    """

    def __init__(self, reward: Reward, window: int = 64, min_count: int = 16):
        super().__init__()
        self.inner, self.window, self.min_count = reward, int(window), int(min_count)
        self.name = f"{reward.name}(normalize=prompt)"
        self.differentiable = reward.differentiable
        self.typical_range = (-3.0, 3.0)
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.window))

    def forward(self, images, prompts):
        scores = self.inner(images, prompts)
        for prompt, value in zip(prompts, scores.detach().float().cpu().tolist()):
            self.history[prompt].append(value)
        everything = [v for h in self.history.values() for v in h]
        means, stds = [], []
        for prompt in prompts:
            values = self.history[prompt] if len(self.history[prompt]) >= self.min_count else everything
            t = torch.tensor(list(values))
            means.append(t.mean())
            stds.append(t.std() if len(t) > 1 else torch.tensor(1.0))
        mean = torch.stack(means).to(scores)
        std = torch.stack(stds).to(scores).clamp_min(1e-6)
        return (scores - mean) / std
