"""Rewards: frozen `nn.Module`s scoring images [B,3,H,W] in [0,1] against their prompts."""

from .base import Reward, load_reward, reward_names

__all__ = ["Reward", "load_reward", "reward_names"]
