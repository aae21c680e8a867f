"""Publish a LoRA to the Hugging Face Hub: the file, its sample images and a model card, in one commit.

    url = push_lora("runs/x/draft_aesthetic.safetensors", "user/name", samples=["runs/x/before_after.png"],
                    reward_curve="runs/x/reward_curve.png", metrics=result.summary())

- The card is built from the LoRA file's own metadata (base model, method, reward, the run's config), so
  any file comfy-rft wrote gets a full card; trainers add the run's metrics and pictures.
- The token comes from `token=`, `HF_TOKEN` or the local huggingface_hub login (`hf auth login`), never
  from an option that ends up in a file. It is checked with `whoami` before anything is uploaded, and it
  never appears in our logs, errors, the card or the uploaded files: huggingface_hub errors are re-raised
  as `UserError`s we write ourselves (with `from None`), with anything token-like redacted.
- The endpoint is `endpoint=`, else `HF_ENDPOINT` read at call time (huggingface_hub itself reads it only
  once, at import), else huggingface_hub's default.
- 429/5xx answers and network errors are retried after `RETRY_WAITS` seconds (through `_sleep`, which
  tests replace); local files are only read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)

RETRY_WAITS: tuple[float, ...] = (1.0, 3.0, 9.0)  # seconds before the 2nd, 3rd and 4th try
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CURVE_NAME = "reward_curve.png"
GRID_NAME = "before_after.png"

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^(?:(?P<namespace>{_NAME})/)?(?P<name>{_NAME})$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{30,}")  # Hub access tokens: hf_ + 34 letters and digits

# modelspec architecture -> (reference Hub model, its license, Hub tags); used when the LoRA was trained
# on a local model that is not a Hub repo id.
_ARCHITECTURES = {
    "stable-diffusion-v1/lora": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m",
                                 ["stable-diffusion"]),
    "stable-diffusion-v2-768-v/lora": ("stabilityai/stable-diffusion-2-1", "openrail++", ["stable-diffusion"]),
    "stable-diffusion-xl-v1-base/lora": ("stabilityai/stable-diffusion-xl-base-1.0", "openrail++",
                                         ["stable-diffusion-xl"]),
}


def _sleep(seconds: float) -> None:
    """Wait between retries (tests replace this)."""
    time.sleep(seconds)


# ---------------------------------------------------------------- validation and token


def validate_repo_id(repo_id: str) -> str:
    """`user/name` (or a bare `name`, put under your account): raise a UserError naming the problem otherwise."""
    text = (repo_id or "").strip()
    how = "give it as user/name or org/name (letters, digits, '-', '_', '.'; at most 96 characters each)"
    if not text:
        raise UserError(f"no Hub repo id given; {how}")
    if text.startswith(("http://", "https://", "hf://")) or text.count("/") > 1:
        raise UserError(f"{text!r} is not a Hub repo id: {how}, without the web address or any sub-path")
    match = _REPO_ID.match(text)
    if not match or "--" in text or ".." in text or text.endswith(".git"):
        raise UserError(f"{text!r} is not a valid Hub repo id: {how}; it may not contain '--' or '..', "
                        f"start or end with '-' or '.', or end in '.git'")
    return text


def _validate_revision(revision: str | None) -> str | None:
    if revision in (None, "", "main"):
        return None
    if not _BRANCH.match(revision) or ".." in revision or revision.endswith(("/", ".lock")) or "//" in revision:
        raise UserError(f"{revision!r} is not a valid branch name: use letters, digits, '-', '_', '.' and '/', "
                        f"e.g. --revision experiment-1")
    return revision


def _token_source() -> str:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the token in HF_TOKEN"
    return "your stored Hugging Face login (hf auth login)"


def resolve_token(token: str | None = None) -> tuple[str, str]:
    """(token, where it came from): `token=`, else HF_TOKEN, else the stored huggingface_hub login."""
    if token:
        return token, "the token passed in"
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as err:  # e.g. an OIDC exchange that failed; its text is not ours to show
        raise UserError(f"could not obtain a Hugging Face token ({type(err).__name__}); set HF_TOKEN to a "
                        f"token with write access, or run `hf auth login`") from None
    if not found:
        raise UserError("no Hugging Face token found: set HF_TOKEN to a token with write access "
                        "(https://huggingface.co/settings/tokens) or run `hf auth login`, then push again. "
                        "Nothing was uploaded.")
    return found, _token_source()


def _redact(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "hf_***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _endpoint(endpoint: str | None) -> str | None:
    value = endpoint or os.environ.get("HF_ENDPOINT") or None
    return value.rstrip("/") if value else None


# ---------------------------------------------------------------- errors and retries


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(err: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, HfHubHTTPError):
        status = _status(err)
        return status is not None and (status == 429 or status >= 500)
    return isinstance(err, httpx2.TransportError) and not isinstance(err, OfflineModeIsEnabled)


def _with_retries(what: str, fn: Callable, waits: Sequence[float], token: str | None):
    """Call fn(); on 429/5xx or a network error wait and try again, `len(waits)` more times at most."""
    for attempt in range(len(waits) + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == len(waits) or not _is_transient(err):
                raise
            logger.warning("Hub: %s failed (%s); retrying in %g s (try %d of %d)", what,
                           _redact(_short(err), token), waits[attempt], attempt + 2, len(waits) + 1)
            _sleep(waits[attempt])


def _short(err: BaseException) -> str:
    status = _status(err)
    if status is not None:
        return f"HTTP {status}"
    return type(err).__name__


def _server_says(err: BaseException, token: str | None) -> str:
    message = getattr(err, "server_message", None) or ""
    message = " ".join(str(message).split())[:300]
    return f" The Hub says: {_redact(message, token)}" if message else ""


def _user_error(err: BaseException, *, action: str, repo_id: str, endpoint: str, token: str | None,
                source: str, tries: int) -> UserError:
    """Our own message for a huggingface_hub/httpx2 failure; never its text, which we do not control."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    untouched = " Nothing was committed; your local files are untouched."
    if isinstance(err, OfflineModeIsEnabled):
        return UserError(f"cannot {action}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset "
                         f"HF_HUB_OFFLINE to push.{untouched}")
    if isinstance(err, HfHubHTTPError):
        status, says = _status(err), _server_says(err, token)
        if status == 401:
            return UserError(f"the Hub at {endpoint} rejected {source} (401 Unauthorized) while trying to {action}: "
                             f"it is invalid or expired. Create a token with write access at "
                             f"https://huggingface.co/settings/tokens and set HF_TOKEN or run "
                             f"`hf auth login --force`.{untouched}")
        if status == 403:
            namespace = repo_id.split("/")[0]
            return UserError(f"{source} may not {action} (403 Forbidden): it needs write access to the namespace "
                             f"{namespace!r}. Use a write token (or a fine-grained one with write access to "
                             f"{namespace!r}), or push to a namespace you own.{says}{untouched}")
        if isinstance(err, RevisionNotFoundError):
            return UserError(f"cannot {action}: the branch does not exist in {repo_id} (404){says}; check "
                             f"--revision.{untouched}")
        if status == 404 or isinstance(err, RepositoryNotFoundError):
            return UserError(f"cannot {action}: {repo_id} was not found on the Hub at {endpoint} (404), or "
                             f"{source} cannot see it. Check the repo id and that the namespace exists and is "
                             f"yours.{says}{untouched}")
        if status == 429 or (status or 0) >= 500:
            return UserError(f"the Hub at {endpoint} kept failing while trying to {action} (HTTP {status}, "
                             f"tried {tries} times); it may be down or rate-limiting: try again "
                             f"later.{says}{untouched}")
        return UserError(f"the Hub refused to {action} (HTTP {status}).{says}{untouched}")
    if isinstance(err, httpx2.HTTPError):
        return UserError(f"cannot reach the Hub at {endpoint} to {action} ({type(err).__name__}): check the "
                         f"network connection, a proxy, or HF_ENDPOINT.{untouched}")
    return UserError(f"cannot {action}: {type(err).__name__}: {_redact(str(err), token)}{untouched}")


# ---------------------------------------------------------------- the model card


def _prompts(config: dict) -> list[str]:
    text = str(config.get("prompts", "") or "")
    if "\n" not in text and len(text) < 4096:
        path = Path(text).expanduser()
        try:
            if path.is_file():
                text = path.read_text(encoding="utf-8")
            elif text.endswith((".txt", ".csv")):
                return []  # a prompts file that is not here any more
        except OSError:
            return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _reward_names(reward: str) -> list[str]:
    """`aesthetic@0.7+hpsv2.1(rho=0.01)@0.3` -> ['aesthetic', 'hpsv2.1']."""
    names = []
    for term in re.sub(r"\([^)]*\)", "", reward).split("+"):
        name = re.sub(r"[^a-z0-9._-]+", "-", term.split("@")[0].strip().lower()).strip("-.")
        if name and name not in names:
            names.append(name)
    return names


def _is_hub_id(model: str) -> bool:
    return bool(model) and model.count("/") == 1 and bool(_REPO_ID.match(model)) and not Path(model).exists()


def _flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _metrics_table(metrics: dict) -> str:
    """before/after pairs (`x_before`/`x_after`, `x.before`/`x.after`) as rows, then any other number."""
    numbers = {k: v for k, v in _flat_numbers(metrics).items() if k not in ("steps", "seconds")}
    rows, used = [], set()
    for key in numbers:
        match = re.match(r"^(.*?)[._]?before$", key)
        if not match:
            continue
        stem = match.group(1)
        after = next((k for k in (f"{stem}_after", f"{stem}.after", f"{stem}after") if k in numbers), None)
        if after is None:
            continue
        label = stem.replace("_", " ").replace(".", " / ") or "reward"
        before_v, after_v = numbers[key], numbers[after]
        rows.append(f"| {label} | {before_v:.4f} | {after_v:.4f} | {after_v - before_v:+.4f} |")
        used |= {key, after}
    lines = []
    if rows:
        lines += ["| metric | before | after | change |", "|---|---:|---:|---:|", *rows]
    others = [(k, v) for k, v in numbers.items() if k not in used]
    if others:
        lines += ["", "| metric | value |", "|---|---:|", *[f"| {k.replace('_', ' ')} | {v:.4f} |" for k, v in others]]
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def build_model_card(metadata: dict[str, str], *, repo_id: str, weight_name: str, images: Sequence[str] = (),
                     reward_curve: str | None = None, config: dict | None = None, metrics: dict | None = None,
                     base_model: str | None = None, license: str | None = None, revision: str | None = None):
    """A `huggingface_hub.ModelCard` for a LoRA, from its safetensors metadata (plus the run's summary).

    `images` and `reward_curve` are paths inside the repo (e.g. `images/before_after.png`); `revision` the
    branch the files go to, if not main.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if config is None:
        try:
            config = json.loads(metadata.get("comfy_rft.config") or "{}")
        except ValueError:
            config = {}
    config = dict(config) if isinstance(config, dict) else {}
    method = metadata.get("comfy_rft.method") or str(config.get("method", "") or "")
    reward = metadata.get("comfy_rft.reward") or str(config.get("reward", "") or "")
    trained_on = metadata.get("comfy_rft.base_model") or str(config.get("model", "") or "")
    architecture = metadata.get("modelspec.architecture", "stable-diffusion-v1/lora")
    reference, default_license, arch_tags = _ARCHITECTURES.get(architecture, _ARCHITECTURES[
        "stable-diffusion-v1/lora"])
    hub_base = base_model or (trained_on if _is_hub_id(trained_on) else reference)
    prompts = _prompts(config)
    title = repo_id.split("/")[-1]
    method_label = method or "reward fine-tuning"

    tags = ["lora", "diffusers", "text-to-image", "reward-fine-tuning", "template:sd-lora", *arch_tags, "comfyui"]
    for tag in ([re.sub(r"[^a-z0-9._-]+", "-", method.lower()).strip("-")] if method else []) + _reward_names(reward):
        if tag and tag not in tags:
            tags.append(tag)

    shown = "; ".join(prompts[:4]) + (" …" if len(prompts) > 4 else "")
    widget = []
    for url in images:
        if Path(url).name == GRID_NAME:
            text = f"before (top row) / after (bottom row) fine-tuning: {shown}" if shown else \
                "before (top row) / after (bottom row) fine-tuning"
        else:
            text = prompts[0] if len(prompts) == 1 else Path(url).stem.replace("_", " ")
        widget.append({"text": text, "output": {"url": url}})

    data = ModelCardData(
        base_model=hub_base, license=license or default_license, library_name="diffusers",
        pipeline_tag="text-to-image", tags=tags, widget=widget or None,
    )

    base_note = "" if hub_base == trained_on else (
        f" (trained on `{trained_on}`; `{hub_base}` is the reference model of its architecture)" if trained_on else "")
    lines = [f"# {title}", ""]
    if widget:
        lines += ["<Gallery />", ""]
    lines += [(f"A LoRA for **{hub_base}**{base_note}, fine-tuned with **{method_label}** to raise the reward "
               f"**{reward or 'unknown'}**, made with [comfy-rft](https://github.com/comfy-rft/comfy-rft). "
               f"The file `{weight_name}` is in the kohya layout: it loads in ComfyUI's LoraLoader and in "
               f"diffusers' `load_lora_weights`."), ""]
    table = _metrics_table(metrics or {})
    if table or reward_curve:
        lines += ["## Results", ""]
        if table:
            lines += [(f"Mean reward of the same prompts and seeds before and after training "
                       f"({reward or 'the training reward'}; held-out rewards, if any, are listed too):"),
                      "", table, ""]
        if reward_curve:
            lines += [f"![reward curve]({reward_curve})", ""]
    if prompts:
        lines += ["## Prompts", "", *[f"- {_md_escape(p)}" for p in prompts[:50]]]
        if len(prompts) > 50:
            lines.append(f"- … and {len(prompts) - 50} more")
        lines.append("")
    example = prompts[0] if prompts else "a photo of a cat"
    lines += [
        "## Use it", "",
        "### ComfyUI", "",
        f"Download `{weight_name}` into `ComfyUI/models/loras/`, e.g.", "",
        "```bash",
        f"hf download {repo_id} {weight_name}{f' --revision {revision}' if revision else ''} "
        "--local-dir ComfyUI/models/loras",
        "```", "",
        ("then put a **LoraLoader** between *Load Checkpoint* and *KSampler*, pick the file and set "
         "`strength_model` (1.0 is the trained strength)."), "",
        "### diffusers", "",
        "```python",
        "import torch",
        "from diffusers import AutoPipelineForText2Image",
        "",
        f'pipe = AutoPipelineForText2Image.from_pretrained("{hub_base}", torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights("{repo_id}", weight_name="{weight_name}"'
        + (f', revision="{revision}")' if revision else ")"),
        f"image = pipe({json.dumps(example)}).images[0]",
        "```", "",
        "## Training", "",
        f"- method: {method_label}",
        f"- reward: `{reward or 'unknown'}`",
        f"- base model: `{trained_on or hub_base}`",
    ]
    for key, label in (("ss_network_dim", "LoRA rank"), ("ss_network_alpha", "LoRA alpha"),
                       ("modelspec.resolution", "resolution"), ("comfy_rft.version", "comfy-rft version")):
        if metadata.get(key):
            lines.append(f"- {label}: {metadata[key]}")
    if metrics and metrics.get("steps") is not None:
        lines.append(f"- optimiser steps: {metrics['steps']}" + (" (interrupted)" if metrics.get("interrupted") else ""))
    if config:
        lines += ["", "<details><summary>Full training config</summary>", "", "```json",
                  json.dumps(config, indent=2, sort_keys=True, default=str), "```", "", "</details>"]
    lines += ["", "## Limitations", "",
              ("Fine-tuning against a reward model raises that model's score, which is not the same as making "
               "better images: past some point the LoRA learns what the reward likes (reward hacking: "
               "over-saturation, repeated textures, lost prompt fidelity or diversity). Compare with the base "
               "model on your own prompts and lower the LoRA strength if the images drift."), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ---------------------------------------------------------------- files of a run


def run_files(lora_path: str | Path) -> tuple[list[Path], Path | None, dict | None]:
    """What a training run left next to its LoRA: (samples, reward curve, summary metrics), where present."""
    folder = Path(lora_path).parent
    grid, curve, summary = folder / GRID_NAME, folder / CURVE_NAME, folder / "summary.json"
    metrics = None
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
            if isinstance(data, dict) and Path(str(data.get("lora", ""))).name == Path(lora_path).name:
                metrics = data
        except (OSError, ValueError):
            metrics = None
    return ([grid] if grid.is_file() else []), (curve if curve.is_file() else None), metrics


def sample_images(folder: str | Path) -> tuple[list[Path], Path | None]:
    """The images of a --samples folder (not recursive), and its reward curve if it holds one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--samples {folder}: not a folder; give a folder of sample images (.png, .jpg, .webp)")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"--samples {folder}: no images (.png, .jpg, .jpeg, .webp) in it")
    curve = next((p for p in images if p.name == CURVE_NAME), None)
    return [p for p in images if p != curve], curve


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return f.read(min(size, 100 * 2**20))


def _refuse_if_token_inside(files: dict[str, Path], weight_name: str, token: str) -> None:
    """Never upload a file that holds the token (a ComfyUI PNG embeds its whole workflow, for one)."""
    needle = token.encode()
    for in_repo, path in files.items():
        data = _safetensors_header(path) if in_repo == weight_name else path.read_bytes()
        if needle in data:
            raise UserError(f"{path} contains your Hugging Face token (in its metadata); refusing to upload it. "
                            f"Re-save it without metadata and consider rotating the token. Nothing was uploaded.")


# ---------------------------------------------------------------- push


def _as_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def push_lora(lora_path: str | Path, repo_id: str, *, samples: Iterable[str | Path] = (),
              reward_curve: str | Path | None = None, config: Any = None, metrics: dict | None = None,
              private: bool = False, revision: str | None = None, base_model: str | None = None,
              license: str | None = None, commit_message: str | None = None, token: str | None = None,
              endpoint: str | None = None, retry_waits: Sequence[float] | None = None) -> str:
    """Create `repo_id` if missing, then commit the LoRA, the images and a README.md card at once; the URL.

    `samples` are image files shown in the card's gallery (`images/<name>` in the repo), `reward_curve` a plot
    shown under Results, `config` the run's config (dict or dataclass; default: the one in the file's
    metadata), `metrics` the run's summary (reward_before/after, held-out rewards…). `revision` is a branch,
    created from main if missing. Raises UserError (never with the token in it) on any failure.
    """
    from . import lora

    # Local checks first: a bad repo id, branch name, LoRA or image path fails before any network call.
    repo_id = validate_repo_id(repo_id)
    branch = _validate_revision(revision)
    lora_path = Path(lora_path)
    _, metadata = lora.read_lora(lora_path)
    weight_name = lora_path.name
    files: dict[str, Path] = {weight_name: lora_path}
    image_urls: list[str] = []
    for sample in samples:
        path = Path(sample)
        if not path.is_file():
            raise UserError(f"sample image {path} not found")
        name, n = path.name, 1
        while f"images/{name}" in files:
            n += 1
            name = f"{path.stem}_{n}{path.suffix}"
        files[f"images/{name}"] = path
        image_urls.append(f"images/{name}")
    curve_url = None
    if reward_curve is not None:
        if not Path(reward_curve).is_file():
            raise UserError(f"reward curve image {reward_curve} not found")
        curve_url = f"images/{CURVE_NAME}" if f"images/{CURVE_NAME}" not in files else "images/reward_curve_plot.png"
        files[curve_url] = Path(reward_curve)
    waits = tuple(RETRY_WAITS if retry_waits is None else retry_waits)
    token, source = resolve_token(token)
    endpoint = _endpoint(endpoint)
    where = endpoint or "https://huggingface.co"

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    step = "check the token"
    try:
        # 1. The token, before anything is created or uploaded.
        who = _with_retries("whoami", lambda: api.whoami(token=token), waits, token)
        role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise UserError(f"{source} is read-only; pushing needs a token with write access "
                            f"(https://huggingface.co/settings/tokens). Nothing was uploaded.")
        if "/" not in repo_id:
            repo_id = f"{who.get('name')}/{repo_id}"
        step = "build the model card"
        card = build_model_card(metadata, repo_id=repo_id, weight_name=weight_name, images=image_urls,
                                reward_curve=curve_url, config=_as_dict(config), metrics=metrics,
                                base_model=base_model, license=license, revision=branch)
        card_text = _redact(str(card), token)  # a token-like string in a prompt or config never goes out
        _refuse_if_token_inside(files, weight_name, token)

        # 2. The repo (and branch), then one commit with every file.
        step = f"create the repo {repo_id}"
        repo_url = _with_retries("create repo", lambda: api.create_repo(
            repo_id, private=private, exist_ok=True, repo_type="model"), waits, token)
        if branch:
            step = f"create the branch {branch!r} of {repo_id}"
            _with_retries("create branch", lambda: api.create_branch(
                repo_id, branch=branch, exist_ok=True, repo_type="model"), waits, token)
        method = metadata.get("comfy_rft.method", "")
        reward = metadata.get("comfy_rft.reward", "")
        message = commit_message or (f"Add {weight_name} ({method} on {reward})" if method and reward
                                     else f"Add {weight_name}")
        step = f"upload to {repo_id}"

        def commit():
            operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(path)) for p, path in files.items()]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode()))
            return api.create_commit(repo_id, operations, commit_message=message, revision=branch,
                                     repo_type="model", commit_description="Uploaded with comfy-rft.")

        info = _with_retries("commit", commit, waits, token)
    except UserError:
        raise
    except Exception as err:
        from huggingface_hub.errors import LocalTokenNotFoundError

        if isinstance(err, LocalTokenNotFoundError):
            raise UserError("no Hugging Face token found: set HF_TOKEN or run `hf auth login`. "
                            "Nothing was uploaded.") from None
        if isinstance(err, ValueError) and "README.md" in str(err):
            raise UserError(f"the Hub rejected the model card's metadata: {_redact(str(err), token)}") from None
        raise _user_error(err, action=step, repo_id=repo_id, endpoint=where, token=token, source=source,
                          tries=len(waits) + 1) from None

    url = str(repo_url).rstrip("/") + (f"/tree/{branch}" if branch else "")
    logger.info("Pushed %s and %d other file(s) to %s (commit %s)", weight_name, len(files), url,
                getattr(info, "oid", "?"))
    return url
