"""Training checkpoints: everything an exact resume needs, written so that a crash never corrupts one.

A checkpoint is one file `checkpoints/step-NNNNNNN.pt`: the LoRA tensors, the optimiser and LR
schedule, every RNG (torch, CUDA, numpy, python, the prompt order), the step, the run's history
and the method's own state (buffers, surrogates). It is written to a temporary file, fsynced and
renamed, so a `step-*.pt` that exists is always complete: the latest checkpoint is simply the one
with the highest step, and a process killed mid-write leaves at worst a stale temporary file.
"""

from __future__ import annotations

import os
import random
import re
import uuid
from pathlib import Path

import torch

from .errors import UserError

_NAME = re.compile(r"^step-(\d{7})\.pt$")
# Options that may change between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = {"steps", "out", "device", "resume", "push_to_hub", "checkpoint_every", "keep_checkpoints",
                     "eval_every", "log_to"}


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    random.setstate(state["python"])


def save_checkpoint(out: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Write `state` for `step` atomically, then delete all but the newest `keep` checkpoints."""
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step-*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    target = folder / f"step-{step:07d}.pt"
    tmp = folder / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return target


def find_checkpoint(out: str | Path, which: str) -> Path:
    """'latest' (the newest in out/checkpoints) or an explicit checkpoint file."""
    if which != "latest":
        path = Path(which).expanduser()
        if not path.is_file():
            raise UserError(f"--resume {which}: no such checkpoint file; pass a step-*.pt file or 'latest'")
        return path
    found = list_checkpoints(out)
    if not found:
        raise UserError(f"--resume latest: no checkpoint in {checkpoint_dir(out)}; start without --resume, or point "
                        f"--out at the run to continue")
    return found[-1]


def load_checkpoint(path: Path, config: dict | None = None) -> dict:
    """Read a checkpoint and, given the resuming run's config, check that it belongs to a run like it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are objects
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {err}") from None
    if config is None:
        return state
    saved = state.get("config", {})
    differing = sorted(k for k in set(saved) | set(config)
                       if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in differing[:6])
        raise UserError(f"cannot resume from {path}: the run was made with other options ({details}). Resume with "
                        f"the same options (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or start a new "
                        f"run in another --out folder")
    return state
