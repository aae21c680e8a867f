"""OCR text match: does the image show the text it was asked for? (non-differentiable)

The engine is RapidOCR (PP-OCR models as ONNX, shipped inside the `rapidocr_onnxruntime` wheel:
offline, no torch). Install it with `pip install "comfy-rft[ocr]"`. Scoring follows Flow-GRPO:
lower-case, drop spaces, 1 if the target occurs in the recognised text, else
1 − min(Levenshtein, len(target)) / len(target).
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError
from .base import Reward

_QUOTED = re.compile(r"[\"“”']([^\"“”']+)[\"“”']")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute), O(len(a)·len(b))."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_match(recognised: str, target: str) -> float:
    rec, tgt = (re.sub(r"\s+", "", s.lower()) for s in (recognised, target))
    if not tgt:
        return 0.0
    if tgt in rec:
        return 1.0
    return 1.0 - min(levenshtein(rec, tgt), len(tgt)) / len(tgt)


class OcrTextMatch(Reward):
    """Score in [0, 1]: the target is `text`, or else the quoted part of each prompt (a sign saying "OPEN")."""

    name = "ocr"
    differentiable = False
    typical_range = (0.0, 1.0)

    def __init__(self, text: str | None = None):
        super().__init__()
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise UserError('the ocr reward needs the optional OCR engine: pip install "comfy-rft[ocr]"') from None
        self.engine = RapidOCR()
        self.text = text

    def target(self, prompt: str) -> str:
        if self.text:
            return self.text
        quoted = _QUOTED.findall(prompt)
        if not quoted:
            raise UserError(f"ocr reward: prompt {prompt!r} has no quoted text to look for; quote it "
                            f"(a sign that says \"OPEN\") or pass ocr(text=...)")
        return " ".join(quoted)

    def forward(self, images, prompts):
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = []
        for array, prompt in zip(pixels, prompts):
            result, _ = self.engine(array[..., ::-1].copy())  # OpenCV order (BGR)
            recognised = "".join(text for _, text, _ in (result or []))
            scores.append(text_match(recognised, self.target(prompt)))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
