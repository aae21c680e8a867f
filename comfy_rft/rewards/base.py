"""The Reward interface every scorer implements."""

from __future__ import annotations

import torch
from torch import nn


class Reward(nn.Module):
    """r(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]. Weights are frozen; gradients flow to pixels.

    `differentiable` says whether that gradient exists (JPEG size, OCR and most user callables have
    none: only LaSRO can use them). `typical_range` is what the scores usually span, for plots and UI.
    """

    name: str = "reward"
    differentiable: bool = True
    typical_range: tuple[float, float] = (0.0, 1.0)

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        self.eval()
        return self

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class LatentReward(Reward):
    """r(latents [B,C,h,w] of the model, prompts) -> Tensor[B]: a reward that reads latents, not pixels.

    It needs no VAE decode, so its gradient is cheap; LaSRO's learned surrogate is one. Unlike image
    rewards it may be trainable: freeze() it before using it as a fixed reward.
    """

    name = "latent-reward"
