"""comfy-rft: reward fine-tuning of diffusion models (DRaFT, RSA-FT, SQDF, LaSRO).

The engine (this package) knows nothing of ComfyUI. The method files live in `trainers/` and the
ComfyUI face in `nodes/` at the repository root; an install maps them to `comfy_rft.trainers` and
`comfy_rft.nodes`. In a bare checkout (a clone in ComfyUI/custom_nodes, or tests run from the
repository) the root is appended to this package's search path so the same names resolve.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "trainers" / "__init__.py").exists() and str(_root) not in __path__:
    __path__.append(str(_root))
