"""The toy world: a tiny text-to-image model of coloured shapes, trained here, and rewards for it.

Real weights cannot be downloaded where the tests run, so whether a method *works* is checked on a
world small enough for a CPU: 32x32 images of one shape ("a red circle on a blue background"), a
latent diffusion model with the real diffusers classes (committed, loads as `--model toy-shapes`),
a proxy reward (`toy-proxy`, one classifier trained on little data: sharp, hackable) and gold
measures it never sees (`toy-gold`, an augmented classifier ensemble; `toy-check`, a program that
reads colour and shape, not differentiable). `bench/toyworld/build.py` makes the files;
`bench/evidence.py` trains every method here.
"""

from __future__ import annotations

from pathlib import Path

TOY_MODEL = "toy-shapes"
HERE = Path(__file__).resolve().parent


def model_dir() -> Path:
    """The committed diffusers folder of the toy model."""
    return HERE / "model"


def classifier_file(role: str) -> Path:
    """The committed proxy ("proxy") or gold ("gold") classifier weights."""
    return HERE / f"{role}.safetensors"
