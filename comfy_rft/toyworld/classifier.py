"""Small CNNs that read the toy world's three attributes and the shape's size, and the score they give.

The proxy reward is one of them trained on few images without augmentation (sharp, hackable, like
a real preference model); the gold measure is an ensemble trained on other data with augmentation.
Both read (shape, colour, background) and the size from a 32x32 image and score the world's
preference (`shapes.preference`): the caption's attributes, and big shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import COLOURS, SHAPES, SIZE

HEADS = (len(SHAPES), len(COLOURS), len(COLOURS), 1)  # three attributes' logits, the size


class AttributeClassifier(nn.Module):
    """Four conv stages (32 -> 16 -> 8 -> 4 px), global max pooling, a linear head per attribute and
    one for the size (a linear regression: outside the sizes it saw it extrapolates, as real reward
    models do)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, sum(HEADS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(to_classifier_input(images))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits [B, 3], [B, 4], [B, 4] for shape, colour and background, and the size [B, 1]."""
        return list(self.head(self.features(images)).split(HEADS, dim=1))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] of any size -> 32x32 in [-1, 1] (antialiased, differentiable)."""
    if images.shape[-1] != SIZE or images.shape[-2] != SIZE:
        images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return images * 2 - 1


def caption_probability(probabilities: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean over the three attributes of the probability given to the caption's value: [B] in [0, 1]."""
    return torch.stack([p.gather(1, labels[:, i:i + 1]).squeeze(1) for i, p in enumerate(probabilities)]).mean(0)


@torch.no_grad()
def caption_hits(ensemble: "Ensemble", images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: the ensemble's most probable shape, colour and background are all the caption's."""
    predicted = torch.stack([p.argmax(1) for p in ensemble.predict(images)[0]], dim=1)
    return (predicted == labels).all(1)


class Ensemble(nn.Module):
    """Classifiers whose attribute probabilities are averaged."""

    def __init__(self, members: list[AttributeClassifier]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def predict(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The members' mean attribute probabilities ([B, 3], [B, 4], [B, 4]) and mean size [B]."""
        outputs = [m(images) for m in self.members]
        probabilities = [torch.stack([o[i].softmax(1) for o in outputs]).mean(0) for i in range(3)]
        return probabilities, torch.stack([o[3].squeeze(1) for o in outputs]).mean(0)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.features(images) for m in self.members], dim=1)


def save_ensemble(ensemble: Ensemble, path: str | Path, role: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in ensemble.state_dict().items()}
    metadata = {"comfy_rft_toy_classifier": role, "widths": json.dumps([m.width for m in ensemble.members])}
    save_file(tensors, str(path), metadata=metadata)


def load_ensemble(path: str | Path, role: str) -> Ensemble:
    """An ensemble saved by `save_ensemble` with this role ("proxy" or "gold"); ValueError otherwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("comfy_rft_toy_classifier") != role:
        raise ValueError(f"{path} is not the toy world's {role} classifier file")
    ensemble = Ensemble([AttributeClassifier(w) for w in json.loads(metadata["widths"])])
    ensemble.load_state_dict(load_file(str(path)))
    return ensemble.requires_grad_(False).eval()
