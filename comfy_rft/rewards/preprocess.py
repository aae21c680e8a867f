"""Differentiable image preprocessing shared by the CLIP-family rewards (torch only, no PIL).

PIL's bicubic resize antialiases when it shrinks; `F.interpolate(..., antialias=True)` does the
same in torch, so a 512 px sample scored here matches the reference pipelines closely while the
gradient still reaches every pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224, mode: str = "crop",
                    mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, clamp: bool = False) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> normalised [B,3,size,size].

    mode "crop": shortest side to `size`, centre crop (CLIP, PickScore, ImageReward, aesthetic);
    mode "pad": longest side to `size`, zero-pad to a square before normalising (HPSv2).
    `clamp` clips to [0,1] first (zeroes the gradient of saturated pixels; off by default).
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if clamp:
        images = images.clamp(0, 1)
    h, w = images.shape[-2:]
    scale = size / (min(h, w) if mode == "crop" else max(h, w))
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    if mode == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top:top + size, left:left + size]
    else:
        pad_h, pad_w = size - new_h, size - new_w
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean_t = images.new_tensor(mean).view(1, 3, 1, 1)
    std_t = images.new_tensor(std).view(1, 3, 1, 1)
    return (images - mean_t) / std_t
