"""A replay buffer of whole sampling trajectories (SQDF's; research/algorithms.md §8.5).

An entry is one rollout: its latents x_T ... x_0 (fp16), its prompt, its reward and the epoch that
made it. The buffer keeps the newest `capacity` entries (FIFO). Latents live in RAM, or with
`spill_dir` in one memory-mapped file per entry that is unlinked as soon as it is mapped: the OS
pages entries in and out as memory requires, and nothing is left on disk when the process ends.

`sample` draws (entry, step) pairs for updates: uniformly (entries without replacement while there
are enough, steps uniform), newest first (steps uniform), or prioritised, P(i, k) ∝ max(r_i, 0)·γ^(T−1−k)
(SQDF's `reward+gamma_PER`). Every draw comes from the generator it is given, so a seeded generator
gives the same draws on every process.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import UserError

SAMPLING = ("uniform", "newest", "prioritized")


class ReplayBuffer:
    def __init__(self, capacity: int, spill_dir: str | Path | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise UserError(f"the replay buffer's capacity must be a positive number of trajectories, got {capacity!r}")
        self.capacity = capacity
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self._latents: list[torch.Tensor] = []  # [T+1, C, H, W] fp16 per entry, oldest first
        self.prompts: list[str] = []
        self.rewards: list[float] = []
        self.epochs: list[int] = []
        self._files = 0

    def __len__(self) -> int:
        return len(self._latents)

    @property
    def steps(self) -> int:
        """Sampling steps T of the stored trajectories (each holds T + 1 latents)."""
        return self._latents[0].shape[0] - 1 if self._latents else 0

    def add(self, latents: torch.Tensor, prompts: list[str], rewards, epoch: int) -> None:
        """Store trajectories `latents` [n, T+1, C, H, W] with their prompts and rewards; the oldest leave when full."""
        rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten().tolist()
        if not len(latents) == len(prompts) == len(rewards):
            raise ValueError(f"{len(latents)} trajectories, {len(prompts)} prompts and {len(rewards)} rewards")
        if self._latents and latents.shape[1:] != self._latents[0].shape:
            raise ValueError(f"trajectories of shape {tuple(latents.shape[1:])} do not fit a buffer of "
                             f"{tuple(self._latents[0].shape)}")
        for trajectory, prompt, reward in zip(latents, prompts, rewards):
            stored = self._storage(trajectory.shape)
            stored.copy_(trajectory.detach())
            self._latents.append(stored)
            self.prompts.append(prompt)
            self.rewards.append(float(reward))
            self.epochs.append(int(epoch))
        excess = len(self) - self.capacity
        if excess > 0:
            for column in (self._latents, self.prompts, self.rewards, self.epochs):
                del column[:excess]

    def _storage(self, shape: torch.Size) -> torch.Tensor:
        if self.spill_dir is None:
            return torch.empty(shape, dtype=torch.float16)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"trajectory-{self._files:08d}.f16"
        self._files += 1
        path.unlink(missing_ok=True)  # a file left by an earlier run in this folder
        stored = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=torch.float16).view(shape)
        try:
            path.unlink()  # the mapping keeps the data alive
        except OSError:  # Windows cannot unlink a mapped file: it stays until the folder is cleaned
            pass
        return stored

    def latent(self, entry: int, step: int) -> torch.Tensor:
        """x at the start of sampling step `step` (0 = x_T) of entry `entry` (0 = oldest), fp16."""
        return self._latents[entry][step]

    def priorities(self, gamma: float) -> torch.Tensor:
        """P(i, k) ∝ max(r_i, 0)·γ^(T−1−k), [entries, T]. When no reward is positive the rewards carry no
        priority: entries are then equally likely and steps keep their γ weighting."""
        weights = torch.tensor(self.rewards, dtype=torch.float64).clamp_min(0)
        if not weights.sum() > 0:
            weights = torch.ones_like(weights)
        steps = self.steps
        discount = torch.tensor(float(gamma), dtype=torch.float64) ** torch.arange(steps - 1, -1, -1)
        table = weights[:, None] * discount[None, :]
        return table / table.sum()

    def sample(self, n: int, mode: str, generator: torch.Generator, gamma: float = 1.0) -> list[tuple[int, int]]:
        """n (entry, step) pairs drawn by `mode` (one of SAMPLING) from `generator`."""
        if not self._latents:
            raise ValueError("the replay buffer is empty")
        size, steps = len(self), self.steps
        if mode == "prioritized":
            flat = torch.multinomial(self.priorities(gamma).flatten(), n, replacement=True, generator=generator)
            return [(int(i) // steps, int(i) % steps) for i in flat]
        if mode == "uniform":
            entries = (torch.randperm(size, generator=generator)[:n] if n <= size
                       else torch.randint(size, (n,), generator=generator)).tolist()
        elif mode == "newest":
            entries = [size - 1 - j % size for j in range(n)]
        else:
            raise UserError(f"unknown buffer sampling {mode!r}; choose one of {', '.join(SAMPLING)}")
        return list(zip(entries, torch.randint(steps, (n,), generator=generator).tolist()))

    def state_dict(self) -> dict:
        """Everything, for a checkpoint. The latents are the buffer's own tensors (no copy, so checkpointing a
        large buffer needs no extra memory): save the dict before the buffer changes."""
        return {"capacity": self.capacity, "latents": list(self._latents), "prompts": list(self.prompts),
                "rewards": list(self.rewards), "epochs": list(self.epochs)}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise UserError(f"the checkpoint's replay buffer holds {state['capacity']} trajectories, this run's "
                            f"{self.capacity}; resume with the same buffer size")
        self._latents, self.prompts, self.rewards, self.epochs = [], [], [], []
        for latents, prompt, reward, epoch in zip(state["latents"], state["prompts"], state["rewards"],
                                                  state["epochs"]):
            self.add(latents[None], [prompt], [reward], epoch)
