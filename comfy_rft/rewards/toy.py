"""Rewards of the toy world (comfy_rft.toyworld): a hackable proxy, a gold ensemble, a program.

All three score the world's preference (`shapes.preference`: the caption's attributes, and big
shapes), about 0..1. Train on `toy-proxy`; `toy-gold` (other data, augmentation, five members,
size clamped to the sizes that exist) and `toy-check` (reads colour, shape and size from the
pixels; no gradient) are the held-out measures that show whether a gain is real or hacked.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..toyworld import classifier_file, shapes
from ..toyworld.classifier import caption_probability, load_ensemble
from .base import Reward


def _labels(prompts: list[str], device) -> torch.Tensor:
    try:
        return shapes.labels(prompts, device)
    except ValueError as err:
        raise UserError(f"{err}. The toy rewards score only the toy world's captions (see `comfy-rft demo`).") from None


class ToyClassifierReward(Reward):
    """The preference as the classifier(s) see it: P(caption's attributes) and the predicted size.

    The proxy takes its size regression as it comes (it extrapolates past the sizes it saw, so it
    can be hacked); the gold clamps it to [0, 1], the sizes the world has.
    """

    typical_range = (0.0, 1.0)

    def __init__(self, role: str, clamp_size: bool):
        super().__init__()
        self.name, self.clamp_size = f"toy-{role}", clamp_size
        self.ensemble = load_ensemble(classifier_file(role), role)
        self.freeze()

    def forward(self, images, prompts):
        probabilities, size = self.ensemble.predict(images.float())
        match = caption_probability(probabilities, _labels(prompts, images.device))
        return shapes.preference(match, size.clamp(0, 1) if self.clamp_size else size)


def proxy() -> ToyClassifierReward:
    return ToyClassifierReward("proxy", clamp_size=False)


def gold() -> ToyClassifierReward:
    return ToyClassifierReward("gold", clamp_size=True)


class ToyCheck(Reward):
    """The preference as a program reads it from the pixels (attributes matched, size). Not differentiable."""

    name = "toy-check"
    differentiable = False
    typical_range = (0.0, 1.0)

    def forward(self, images, prompts):
        return shapes.preference(*shapes.check(images, _labels(prompts, images.device)))
