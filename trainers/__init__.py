"""Reward fine-tuning methods, one file each: a Config dataclass and a `Method` subclass.

`METHODS` maps the CLI's `--method` names to (config class, method class).
"""

from .draft import DraftConfig, DraftMethod

METHODS = {
    "draft": (DraftConfig, DraftMethod),
}

__all__ = ["METHODS", "DraftConfig", "DraftMethod"]
