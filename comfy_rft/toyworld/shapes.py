"""The toy world's images: one coloured shape on a coloured background, 32x32, and their captions.

Procedural, so the data is unlimited and the truth is known: a caption "a red circle on a blue
background" names three attributes, and the world's "aesthetic" prefers big shapes; a program
can read both from any image (`check`), independently of every learned model. `preference`
combines them; every toy reward scores it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

SIZE = 32
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.70, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.12),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_NAMES = tuple(COLOURS)
MIN_RADIUS, MAX_RADIUS = 6.0, 10.0  # a shape's size 0..1 maps to this radius in pixels
AREA_PER_RADIUS2 = (torch.pi, (2 * 0.85) ** 2, 3 * 3**0.5 / 4 * 1.2**2)  # circle, square, triangle (see _masks)
_CAPTION = re.compile(r"^a (\w+) (\w+) on an? (\w+) background$")


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list[str]:
    """Every caption of the world: 4 colours x 3 shapes x 3 other background colours = 36."""
    return [caption(c, s, b) for s in SHAPES for c in COLOUR_NAMES for b in COLOUR_NAMES if b != c]


def parse_caption(text: str) -> tuple[int, int, int]:
    """(shape, colour, background) indices of a caption; ValueError names the expected form."""
    match = _CAPTION.match(text.strip().lower())
    if not match or match[2] not in SHAPES or match[1] not in COLOURS or match[3] not in COLOURS:
        raise ValueError(f"{text!r} is not a toy-world caption; expected 'a <colour> <shape> on a <colour> "
                         f"background' with colours {', '.join(COLOUR_NAMES)} and shapes {', '.join(SHAPES)}")
    return SHAPES.index(match[2]), COLOUR_NAMES.index(match[1]), COLOUR_NAMES.index(match[3])


def labels(prompts: list[str], device=None) -> torch.Tensor:
    """[B, 3] long tensor of (shape, colour, background) for captions."""
    return torch.tensor([parse_caption(p) for p in prompts], dtype=torch.long, device=device)


def _masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, angle: torch.Tensor,
           grid: int) -> torch.Tensor:
    """Soft-free binary masks [B, grid, grid] of each shape on a supersampled grid (coordinates in pixels)."""
    coords = (torch.arange(grid) + 0.5) * SIZE / grid
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx.view(-1, 1, 1), y - cy.view(-1, 1, 1)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotated frame
    r = r.view(-1, 1, 1)
    circle = dx**2 + dy**2 <= r**2
    square = torch.maximum(u.abs(), v.abs()) <= 0.85 * r
    # An equilateral triangle pointing up (in its rotated frame), circumradius 1.2 r.
    R = 1.2 * r
    triangle = (v <= R / 2) & (v >= -R + 3**0.5 * u.abs() * 1.0) & (v >= -R)
    kind = shape.view(-1, 1, 1)
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def render(attributes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [0, 1] for (shape, colour, background) rows (see `render_sized`)."""
    return render_sized(attributes, generator)[0]


def render_sized(attributes: torch.Tensor, generator: torch.Generator | None = None):
    """Images for (shape, colour, background) rows, with random position, size, rotation, colour jitter
    and a little pixel noise (anti-aliased by 4x supersampling), and each shape's size in [0, 1]."""
    n = len(attributes)
    rand = lambda *s: torch.rand(*s, generator=generator)  # noqa: E731
    size = rand(n)
    r = MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * size
    cx, cy = 16 + (rand(n) - 0.5) * 2 * (15 - r - 1), 16 + (rand(n) - 0.5) * 2 * (15 - r - 1)
    angle = (rand(n) - 0.5) * 0.6  # up to ±17°: a triangle stays a triangle
    mask = _masks(attributes[:, 0], cx, cy, r, angle, SIZE * 4).float().unsqueeze(1)
    mask = F.avg_pool2d(mask, 4)
    palette = torch.tensor(list(COLOURS.values()))
    fg = palette[attributes[:, 1]] + (rand(n, 3) - 0.5) * 0.12
    bg = palette[attributes[:, 2]] + (rand(n, 3) - 0.5) * 0.12
    images = mask * fg.view(n, 3, 1, 1) + (1 - mask) * bg.view(n, 3, 1, 1)
    images = images + torch.randn(images.shape, generator=generator) * 0.015
    return images.clamp(0, 1), size


def random_attributes(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n uniformly drawn (shape, colour, background) rows with background != colour."""
    shape = torch.randint(0, len(SHAPES), (n,), generator=generator)
    colour = torch.randint(0, len(COLOURS), (n,), generator=generator)
    background = (colour + torch.randint(1, len(COLOURS), (n,), generator=generator)) % len(COLOURS)
    return torch.stack([shape, colour, background], dim=1)


def _nearest_colour(rgb: torch.Tensor) -> torch.Tensor:
    palette = torch.tensor(list(COLOURS.values()), device=rgb.device)
    return (rgb.float().unsqueeze(-2) - palette).norm(dim=-1).argmin(dim=-1)


@torch.no_grad()
def read_attributes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a program sees in each image: [B, 3] (shape, colour, background), -1 where nothing is found,
    and [B] the shape's size (its radius from its area, mapped as in `render_sized`; unbounded).

    Background: the nearest palette colour to the median border pixel. Shape pixels: those far from
    the background colour; their mean gives the colour, and their area over the squared distance of
    the farthest one from their centre the shape, whatever its rotation (circle π, square 2,
    equilateral triangle 1.3).
    """
    images = images.detach().float().clamp(0, 1)
    n = len(images)
    border = torch.cat([images[:, :, :2].flatten(2), images[:, :, -2:].flatten(2),
                        images[:, :, 2:-2, :2].flatten(2), images[:, :, 2:-2, -2:].flatten(2)], dim=2)
    bg_rgb = border.median(dim=2).values  # [B, 3]
    out = torch.full((n, 3), -1, dtype=torch.long)
    size = torch.zeros(n)
    out[:, 2] = _nearest_colour(bg_rgb).cpu()
    far = (images - bg_rgb.view(n, 3, 1, 1)).norm(dim=1) > 0.35  # [B, H, W]
    for i in range(n):
        ys, xs = far[i].nonzero(as_tuple=True)
        if len(ys) < 12:
            continue
        out[i, 1] = _nearest_colour(images[i][:, ys, xs].mean(dim=1)).item()
        cy, cx = ys.float().mean(), xs.float().mean()
        reach = ((ys - cy) ** 2 + (xs - cx) ** 2).max().sqrt() + 0.5
        compactness = len(ys) / reach.item() ** 2
        out[i, 0] = 2 if compactness < 1.65 else 1 if compactness < 2.55 else 0
        radius = (len(ys) / AREA_PER_RADIUS2[out[i, 0]]) ** 0.5
        size[i] = (radius - MIN_RADIUS) / (MAX_RADIUS - MIN_RADIUS)
    return out, size


def preference(caption_match: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The world's preference: half caption fidelity (0..1), half the shape's size (0..1 in the data)."""
    return (caption_match + size) / 2


def check(images: torch.Tensor, caption_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the program finds against each caption's `labels`: the fraction of its three attributes
    read in the image (0, 1/3, 2/3, 1) and the shape's size clamped to [0, 1] (0 where none is found)."""
    attributes, size = read_attributes(images)
    match = (attributes == caption_labels.cpu()).float().mean(dim=1)
    return match.to(images.device), size.clamp(0, 1).to(images.device)
