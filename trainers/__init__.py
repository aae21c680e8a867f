"""Reward fine-tuning methods, one file each: a Config dataclass and a `Method` subclass.

`METHODS` maps the CLI's `--method` names to (config class, method class).
"""

from .draft import DraftConfig, DraftMethod
from .rsaft import RsaftConfig, RsaftMethod
from .sqdf import SqdfConfig, SqdfMethod

METHODS = {
    "draft": (DraftConfig, DraftMethod),
    "rsaft": (RsaftConfig, RsaftMethod),
    "sqdf": (SqdfConfig, SqdfMethod),
}

__all__ = ["METHODS", "DraftConfig", "DraftMethod", "RsaftConfig", "RsaftMethod", "SqdfConfig", "SqdfMethod"]
