"""Pictures a person looks at after a run: reward curves and before/after image grids."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [0,1] -> PIL images."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def image_grid(rows: list[torch.Tensor], labels: list[str], path: str | Path, min_cell: int = 128) -> Path:
    """One labelled row of images per tensor (e.g. before / after), upscaled so tiny images are visible."""
    pil_rows = [to_pil(r) for r in rows]
    h, w = pil_rows[0][0].height, pil_rows[0][0].width
    scale = max(1, -(-min_cell // max(h, w)))
    cell_h, cell_w, label_w = h * scale, w * scale, 70
    cols = max(len(r) for r in pil_rows)
    grid = Image.new("RGB", (label_w + cols * cell_w, len(pil_rows) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for y, (row, label) in enumerate(zip(pil_rows, labels)):
        draw.text((4, y * cell_h + cell_h // 2 - 6), label, fill="black")
        for x, img in enumerate(row):
            grid.paste(img.resize((cell_w, cell_h), Image.NEAREST), (label_w + x * cell_w, y * cell_h))
    path = Path(path)
    grid.save(path)
    return path


def plot_curves(series: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str,
                ylabel: str = "reward") -> Path:
    """Line plot of named (x, y) series, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, (xs, ys) in series.items():
        few = len(xs) <= 3  # a before/after pair is two points, not a trend line
        ax.plot(xs, ys, marker="o" if few else None, linestyle="none" if few else "-", label=name)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
