"""The Reward interface, the built-in registry and spec parsing."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UserError


class Reward(nn.Module):
    """r(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]. Weights are frozen; gradients flow to pixels."""

    name: str = "reward"
    differentiable: bool = True
    typical_range: tuple[float, float] = (0.0, 1.0)

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        self.eval()
        return self

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Brightness(Reward):
    """Mean luma (Rec. 601) of the image: a simple differentiable reward for demos and tests."""

    name = "brightness"
    typical_range = (0.0, 1.0)

    def forward(self, images, prompts):
        weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * weights).sum(1).mean(dim=(1, 2))


# name -> (factory, one-line description). The rewards issue adds the model-based ones.
_REGISTRY: dict[str, tuple[Callable[[], Reward], str]] = {
    "brightness": (Brightness, "mean luma in [0, 1]; differentiable, needs no files"),
}


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def load_reward(spec: str) -> Reward:
    """A built-in reward by name."""
    name = spec.strip().lower()
    if name not in _REGISTRY:
        raise UserError(f"unknown reward {spec!r}; built-in rewards: {', '.join(reward_names())}")
    return _REGISTRY[name][0]().freeze()
