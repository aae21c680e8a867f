"""Where per-step and evaluation metrics go: `metrics.jsonl` always; TensorBoard and wandb on request."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

SINKS = ("tensorboard", "wandb")


class MetricsLog:
    """One JSON object per line in out/metrics.jsonl (kept up to `resume_step` when resuming)."""

    def __init__(self, out: Path, sinks: str = "", config: dict | None = None, resume_step: int | None = None):
        self.path = Path(out) / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():  # drop rows written after the checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.file = self.path.open("w", encoding="utf-8")
        self.file.writelines(line + "\n" for line in kept)
        self.file.flush()
        self._tensorboard = self._wandb = None
        for sink in (s.strip() for s in sinks.split(",") if s.strip()):
            if sink not in SINKS:
                raise UserError(f"--log-to {sink!r} is not known; use any of {', '.join(SINKS)} (comma-separated)")
            self._open(sink, Path(out), config or {})

    def _open(self, sink: str, out: Path, config: dict) -> None:
        try:
            if sink == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(out / "tensorboard"))
            else:
                import wandb

                self._wandb = wandb.init(project="comfy-rft", config=config, dir=str(out))
        except ImportError:
            raise UserError(f"--log-to {sink} needs the {sink} package: pip install {sink}") from None

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, row["step"])
        if self._wandb is not None:
            self._wandb.log(numbers, step=row["step"])

    def close(self) -> None:
        self.file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
