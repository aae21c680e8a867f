"""Rewards that need no weights: brightness (differentiable) and JPEG (in)compressibility (not)."""

from __future__ import annotations

import io

import torch

from .base import Reward


class Brightness(Reward):
    """Mean luma (Rec. 601) of the image: a simple differentiable reward for demos and tests."""

    name = "brightness"
    typical_range = (0.0, 1.0)

    def forward(self, images, prompts):
        weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * weights).sum(1).mean(dim=(1, 2))


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image saved as JPEG at `quality` (DDPO's measure; 8-bit, no gradient)."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(Reward):
    """−(JPEG size in kB): smaller files score higher (DDPO's compressibility task). Not differentiable."""

    name = "jpeg"
    differentiable = False
    typical_range = (-300.0, 0.0)

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = int(quality)

    def forward(self, images, prompts):
        return -jpeg_kilobytes(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """+(JPEG size in kB): busier images score higher (DDPO's incompressibility task). Not differentiable."""

    name = "jpeg-incompressibility"
    typical_range = (0.0, 300.0)

    def forward(self, images, prompts):
        return jpeg_kilobytes(images, self.quality)
