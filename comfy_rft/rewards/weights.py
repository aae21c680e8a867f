"""Finding reward weights on disk. Never a download.

Order: an explicit path; the ComfyUI `models/rewards` folders (ComfyUI's own registry when running
inside it, else $COMFYUI_MODELS_DIR or $COMFYUI_DIR/models); $COMFY_RFT_REWARDS_DIR; then the local
Hugging Face cache (local_files_only). A miss names the file, where it is published and where to
put it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

REWARDS_FOLDER = "rewards"


def reward_dirs() -> list[Path]:
    """Folders searched for reward files, in order."""
    dirs: list[Path] = []
    try:  # inside ComfyUI: its registry knows every configured models path (extra_model_paths.yaml too)
        import folder_paths  # type: ignore[import-not-found]

        if REWARDS_FOLDER in getattr(folder_paths, "folder_names_and_paths", {}):
            dirs += [Path(p) for p in folder_paths.get_folder_paths(REWARDS_FOLDER)]
    except ImportError:
        pass
    models = os.environ.get("COMFYUI_MODELS_DIR") or (
        os.path.join(os.environ["COMFYUI_DIR"], "models") if os.environ.get("COMFYUI_DIR") else None)
    if models:
        dirs.append(Path(models) / REWARDS_FOLDER)
    if os.environ.get("COMFY_RFT_REWARDS_DIR"):
        dirs.append(Path(os.environ["COMFY_RFT_REWARDS_DIR"]))
    return list(dict.fromkeys(dirs))


def find_weights(reward: str, name: str, *, explicit: str | None = None, option: str,
                 hf_repo: str | None = None, hf_filename: str | None = None, published: str = "") -> Path:
    """The local path of a reward file or folder called `name`.

    `option` is the spec option that takes an explicit path (named in the error); `hf_repo` (and
    `hf_filename` for a single file, else the whole snapshot folder) is looked up in the local HF cache.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise UserError(f"{reward}: {option}={explicit} does not exist. Pass the path of {name}.")
        return path
    for folder in reward_dirs():
        if (folder / name).exists():
            return folder / name
    if hf_repo:
        cached = _hf_cache(hf_repo, hf_filename)
        if cached is not None:
            return cached
    where = ", ".join(str(d) for d in reward_dirs()) or "ComfyUI/models/rewards (set COMFYUI_DIR or COMFY_RFT_REWARDS_DIR)"
    source = f"It is published at {published}. " if published else ""
    raise UserError(
        f"{reward}: {name} not found. {source}Nothing is downloaded: put it in {where}, or pass "
        f"{reward}({option}=PATH) in the reward spec."
    )


def _hf_cache(repo: str, filename: str | None) -> Path | None:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename:
            return Path(hf_hub_download(repo, filename, local_files_only=True))
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, offline mode, a broken cache: all mean "not here"
        return None
