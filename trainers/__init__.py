"""Reward fine-tuning methods, one file each: a Config dataclass and a `Method` subclass.

`METHODS` maps the CLI's `--method` names to (config class, method class).
"""

from .draft import DraftConfig, DraftMethod
from .lasro import LasroConfig, LasroMethod
from .rsaft import RsaftConfig, RsaftMethod
from .sqdf import SqdfConfig, SqdfMethod

METHODS = {
    "draft": (DraftConfig, DraftMethod),
    "rsaft": (RsaftConfig, RsaftMethod),
    "sqdf": (SqdfConfig, SqdfMethod),
    "lasro": (LasroConfig, LasroMethod),
}

__all__ = ["METHODS", "DraftConfig", "DraftMethod", "LasroConfig", "LasroMethod", "RsaftConfig", "RsaftMethod",
           "SqdfConfig", "SqdfMethod"]
