"""A user's own reward: any `module:function` taking (images [B,3,H,W] in [0,1], prompts)."""

from __future__ import annotations

import importlib

import torch

from ..errors import UserError
from .base import Reward


class CallableReward(Reward):
    """Wraps `fn(images, prompts) -> Tensor[B] | list[float]`.

    Whether gradients flow through it is the user's word (`differentiable=true` in the spec, or a
    `differentiable` attribute on the function): we cannot tell a torch function from one that
    detaches inside.
    """

    def __init__(self, fn, name: str, differentiable: bool | None = None):
        super().__init__()
        self.fn, self.name = fn, name
        self.differentiable = bool(getattr(fn, "differentiable", False) if differentiable is None else differentiable)

    def forward(self, images, prompts):
        scores = self.fn(images, prompts)
        scores = scores if isinstance(scores, torch.Tensor) else torch.tensor(scores, dtype=torch.float32)
        if scores.shape != (images.shape[0],):
            raise UserError(f"reward {self.name} returned shape {tuple(scores.shape)}; it must return one score per "
                            f"image, shape ({images.shape[0]},)")
        return scores.to(images.device)


def load_callable(target: str, differentiable: bool | None = None) -> CallableReward:
    """Import `module:function` (the module must be importable: installed, or on PYTHONPATH)."""
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as err:
        raise UserError(f"reward {target!r}: cannot import module {module_name!r} ({err}); put it on PYTHONPATH "
                        f"or install it") from err
    except AttributeError:
        raise UserError(f"reward {target!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(fn):
        raise UserError(f"reward {target!r} is not callable")
    return CallableReward(fn, target, differentiable)
