"""ComfyUI's folders (models/loras, models/rewards, input, output), read lazily.

Outside ComfyUI (tests, schema rendering) `folder_paths` is missing: lists are empty and folders fall
back to the engine's own environment variables, so every node definition still builds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

AUTO = "(auto)"  # combo value: let the engine search its usual places
NONE = "(none)"


def _folder_paths():
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        return None
    return folder_paths


def lora_files() -> list[str]:
    """LoRA files ComfyUI lists (models/loras and extra_model_paths.yaml folders), as the stock loader shows them."""
    fp = _folder_paths()
    return list(fp.get_filename_list("loras")) if fp else []


def loras_dir() -> Path:
    fp = _folder_paths()
    if fp is None:
        raise RuntimeError("ComfyUI's folder_paths is not importable: the LoRA folder is only known inside ComfyUI")
    return Path(fp.get_folder_paths("loras")[0])


def lora_path(name: str) -> Path:
    fp = _folder_paths()
    path = fp.get_full_path("loras", name) if fp else None
    if not path:
        from comfy_rft.errors import UserError

        raise UserError(f"LoRA {name!r} not found in models/loras; pick a file from the list (refresh the page "
                        f"after adding files)")
    return Path(path)


def output_dir() -> Path:
    fp = _folder_paths()
    return Path(fp.get_output_directory()) if fp else Path(os.environ.get("COMFY_RFT_OUTPUT", "output"))


def temp_dir() -> Path:
    fp = _folder_paths()
    return Path(fp.get_temp_directory()) if fp else Path(os.environ.get("TMPDIR", "/tmp"))


def input_dir() -> Path | None:
    fp = _folder_paths()
    return Path(fp.get_input_directory()) if fp else None


def prompt_files() -> list[str]:
    """[NONE] + the .txt files in ComfyUI's input folder and its sub-folders (one level: the folder is read
    each time the node list is served, and input folders hold many images)."""
    folder = input_dir()
    names = []
    if folder is not None and folder.is_dir():
        names = sorted(str(p.relative_to(folder)).replace(os.sep, "/")
                       for pattern in ("*.txt", "*/*.txt") for p in folder.glob(pattern) if p.is_file())
    return [NONE, *names]


def reward_dirs() -> list[Path]:
    from comfy_rft.rewards.weights import reward_dirs as engine_reward_dirs

    return engine_reward_dirs()


def reward_candidates(kind: str, extensions: tuple[str, ...] = ()) -> list[str]:
    """[AUTO] + files (with one of `extensions`) or folders (kind "folder") found in the reward folders,
    relative to the folder they are in, two levels deep."""
    found: list[str] = []
    for root in reward_dirs():
        if not root.is_dir():
            continue
        for depth in ("*", "*/*"):
            for p in sorted(root.glob(depth)):
                if p.name.startswith("."):
                    continue
                if kind == "folder" and p.is_dir() or kind == "file" and p.is_file() and p.suffix.lower() in extensions:
                    found.append(str(p.relative_to(root)).replace(os.sep, "/"))
    return [AUTO, *dict.fromkeys(found)]


def resolve_reward_path(name: str) -> str | None:
    """The absolute path of a reward file/folder chosen in a picker; None for AUTO (the engine searches)."""
    if not name or name == AUTO:
        return None
    if os.path.isabs(name) and os.path.exists(name):
        return name
    for root in reward_dirs():
        if (root / name).exists():
            return str(root / name)
    from comfy_rft.errors import UserError

    raise UserError(f"{name} is not in the reward folders ({', '.join(map(str, reward_dirs()))}); refresh the page "
                    f"or pick another file")


def next_free_name(folder: Path, prefix: str, suffix: str = ".safetensors") -> Path:
    """`<folder>/<prefix>_<NNNNN><suffix>` with the first counter not yet used (like ComfyUI's Save nodes)."""
    target = folder / prefix
    target.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(target.name) + r"_(\d{5})" + re.escape(suffix) + "$")
    used = [int(m.group(1)) for p in target.parent.iterdir() if (m := pattern.match(p.name))]
    return target.parent / f"{target.name}_{max(used, default=0) + 1:05d}{suffix}"


def safe_relative(prefix: str) -> str:
    """A user-typed file prefix made safe to join under a folder: no absolute paths, no '..'."""
    parts = [p for p in re.split(r"[\\/]+", prefix.strip()) if p not in ("", ".", "..")]
    cleaned = [re.sub(r"[^A-Za-z0-9_.\- ]+", "_", p).strip() for p in parts]
    return "/".join(p for p in cleaned if p) or "lora"
