"""The values that travel along the pack's own sockets (RFT_LORA, RFT_TRAINING_LOG). No torch at import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoraPayload:
    """A LoRA in the file contract (DESIGN.md §3): kohya keys, alpha = lora_alpha, and its safetensors metadata."""

    state_dict: dict  # str -> torch.Tensor (CPU, contiguous)
    metadata: dict[str, str]
    source: str = ""  # where it came from: a run folder, or the file it was read from

    @property
    def architecture(self) -> str:
        return self.metadata.get("modelspec.architecture", "")

    def describe(self) -> str:
        modules = {k.partition(".")[0] for k in self.state_dict}
        method = self.metadata.get("comfy_rft.method", "?")
        return (f"{len(modules)} LoRA layers, rank {self.metadata.get('ss_network_dim', '?')}, alpha "
                f"{self.metadata.get('ss_network_alpha', '?')}, {method} on {self.metadata.get('comfy_rft.reward', '?')}")


@dataclass
class TrainingLog:
    """What a training run did: per-step metrics, periodic evaluations and where its files are."""

    method: str
    reward: str
    config: dict[str, Any]
    history: list[dict] = field(default_factory=list)  # one row per optimiser step (the loop's metrics)
    evaluations: list[dict] = field(default_factory=list)  # {"step", "reward", "heldout": {name: mean}}
    summary: dict[str, Any] = field(default_factory=dict)  # the loop's TrainResult
    run_dir: str = ""
    checkpoint: str = ""  # the last checkpoint LoRA written (models/loras/rft_checkpoints/...)
    interrupted: bool = False

    def text(self) -> str:
        lines = [f"{self.method} on {self.reward}: {len(self.history)} steps"]
        if self.summary:
            lines.append(f"reward {self.summary.get('reward_before', float('nan')):.4f} -> "
                         f"{self.summary.get('reward_after', float('nan')):.4f} "
                         f"({self.summary.get('seconds', 0):.1f} s)")
        if self.evaluations and self.evaluations[-1].get("heldout"):
            first, last = self.evaluations[0]["heldout"], self.evaluations[-1]["heldout"]
            for name, value in last.items():
                lines.append(f"held-out {name}: {first.get(name, float('nan')):.4f} -> {value:.4f}")
        if self.run_dir:
            lines.append(f"run folder: {self.run_dir}")
        if self.checkpoint:
            lines.append(f"checkpoint: {self.checkpoint}")
        return "\n".join(lines)
