"""Data parallelism over several processes with torch.distributed (launched by torchrun or accelerate).

Each process renders its own slice of every step's global batch (the slices are fixed by sample
index, so the update does not depend on how the batch is split), gradients are averaged across
processes before clipping, metrics are gathered, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Processes":
        """Join the process group torchrun/accelerate describe in the environment (one process: no group)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))

    def device(self, requested: str) -> str:
        """Each process drives its own GPU."""
        return f"cuda:{self.local_rank}" if self.world > 1 and requested.startswith(("cuda", "auto")) and \
            torch.cuda.is_available() else requested

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor from every process, in rank order."""
        if self.world == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.world)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
