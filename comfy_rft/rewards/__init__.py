"""Rewards: frozen `nn.Module`s scoring images [B,3,H,W] in [0,1] against their prompts.

Model-based rewards are imported only when a spec names them, so importing this package is cheap.
"""

from .base import Reward
from .registry import BUILTINS, load_reward, parse_spec, reward_names

__all__ = ["BUILTINS", "Reward", "load_reward", "parse_spec", "reward_names"]
