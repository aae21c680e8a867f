"""LoRA adapters: inject with peft, export/import the kohya file contract, scale and mix at inference.

The file contract (DESIGN.md §3) is what loads everywhere: kohya keys
`lora_unet_<layer path, dots -> _>.lora_down.weight / .lora_up.weight / .alpha` with `.alpha` the
training `lora_alpha` (not the rank). SD1.x/SD2 UNets use diffusers paths (diffusers' SD1 loader rejects
LDM names); SDXL UNets use LDM/sgm paths (both loaders take them and they keep `label_emb`); text
encoders use `lora_te[12]_text_model_...` even where transformers 5 dropped the `text_model` level.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_PREFIXES = ("lora_te", "lora_te1", "lora_te2")
# modelspec architecture -> kohya `ss_base_model_version`.
ARCHITECTURES = {
    "stable-diffusion-v1/lora": "sd_v1",
    "stable-diffusion-v2-768-v/lora": "sd_v2",
    "stable-diffusion-xl-v1-base/lora": "sdxl_base_v1-0",
}
_DOWN, _UP, _ALPHA = "lora_down.weight", "lora_up.weight", "alpha"

# diffusers -> LDM/sgm names of the UNet parts outside the block structure, and inside a resnet.
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SGM_MID = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}


# ---------------------------------------------------------------- injection


def _lora_layers(module: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(path, peft LoRA layer) for every layer of `module` that carries `adapter_name`, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def _require_new_adapter(module: nn.Module, adapter_name: str) -> None:
    if adapter_name in getattr(module, "peft_config", {}) or _lora_layers(module, adapter_name):
        raise UserError(
            f"{type(module).__name__} already has a LoRA adapter named {adapter_name!r}; pass another adapter_name"
        )


def _add_adapter(module: nn.Module, config, adapter_name: str) -> None:
    """Inject through the model's own `add_adapter` (diffusers/transformers bookkeeping, so their
    `set_adapters`/`load_lora_weights` keep working), else through peft directly (e.g. ComfyUI models)."""
    from peft import inject_adapter_in_model

    _require_new_adapter(module, adapter_name)
    if hasattr(module, "add_adapter"):
        with warnings.catch_warnings():  # peft warns on every adapter after the first; several are intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            module.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, module, adapter_name)
        for _, layer in _lora_layers(module, adapter_name):
            layer.set_adapter(adapter_name)


def _adapter_params(module: nn.Module, adapter_name: str, trainable: bool) -> list[nn.Parameter]:
    """The adapter's lora_A/lora_B weights in module order, made fp32 (peft copies a half base's dtype)."""
    params = []
    for _, layer in _lora_layers(module, adapter_name):
        for p in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight):
            p.data = p.data.float()
            p.requires_grad_(trainable)
            params.append(p)
    return params


def _matches(path: str, targets) -> bool:
    """peft's rule for a list of target names: the whole path or its last dotted components."""
    return any(path == t or path.endswith("." + t) for t in targets)


def inject_lora(
    module: nn.Module,
    rank: int,
    alpha: float,
    target_modules=DEFAULT_TARGETS,
    init="gaussian",
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Add a peft LoRA adapter to `module` and return its trainable parameters (fp32, fixed order).

    `init` is peft's `init_lora_weights` (True, "gaussian", False, ...); lora_B starts at zero unless False.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}; use e.g. rank=4 to 64")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha!r}; use e.g. alpha=rank (scale 1)")
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    layers = _adaptable_layers(module)
    if not any(_matches(p, targets) for p in layers):
        names = sorted({p.rsplit(".", 1)[-1] for p in layers})
        raise UserError(
            f"target_modules {list(targets)} match no Linear/Conv layer of {type(module).__name__}; "
            f"use names of its layers, e.g. {names[:12]}"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init)
    _add_adapter(module, config, adapter_name)
    return _adapter_params(module, adapter_name, trainable=True)


def remove_adapters(module: nn.Module) -> int:
    """Put every peft-wrapped layer of `module` back to its base layer and drop peft's bookkeeping.

    Returns how many layers were unwrapped. The module is then the model it was before any injection.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    removed = 0
    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
            removed += 1
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in module.__dict__:
            delattr(module, attr)
    return removed


# ---------------------------------------------------------------- naming


def _adaptable_layers(module: nn.Module) -> list[str]:
    """Paths of the layers a LoRA can target: Linear/Conv2d, or existing LoRA wrappers (not their insides)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    paths, inside = [], None
    for name, m in module.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(m, BaseTunerLayer):
            paths.append(name)
            inside = name + "."
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            paths.append(name)
    return paths


def _is_sdxl(unet: nn.Module) -> bool:
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def _sgm_path(path: str, config) -> str | None:
    """The LDM/sgm path of a diffusers SD/SDXL UNet layer, derived from the UNet config; None if it has none.

    diffusers' `_maybe_map_sgm_blocks_to_diffusers` is the inverse this must satisfy.
    """
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    parts = path.split(".")
    n = config.layers_per_block + 1  # sgm blocks per diffusers down block (resnets + sampler) / up block
    try:
        if parts[0] == "mid_block":
            block, (kind, rest) = f"middle_block.{_SGM_MID[parts[1], int(parts[2])]}", (parts[1], parts[3:])
        elif parts[0] in ("down_blocks", "up_blocks"):
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "downsamplers":
                block, rest = f"input_blocks.{(i + 1) * n}.0", ["op", *rest[1:]]
            elif kind == "upsamplers":
                has_attention = "CrossAttn" in config.up_block_types[i]
                block = f"output_blocks.{i * n + n - 1}.{2 if has_attention else 1}"
            elif kind in ("resnets", "attentions"):
                index = 1 + i * n + j if parts[0] == "down_blocks" else i * n + j
                group = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
                block = f"{group}.{index}.{0 if kind == 'resnets' else 1}"
            else:
                return None
        else:
            return None
    except (KeyError, IndexError, ValueError):
        return None
    if kind == "resnets" and rest and rest[0] in _SGM_RESNET:
        rest = [_SGM_RESNET[rest[0]], *rest[1:]]
    return ".".join([block, *rest])


def _unet_key(unet: nn.Module, path: str) -> str:
    if _is_sdxl(unet):
        sgm = _sgm_path(path, unet.config)
        if sgm is None:
            raise UserError(
                f"UNet layer {path!r} has no SDXL (sgm) name, so no loader could apply it; "
                "target layers inside the down/mid/up blocks or the time/label embeddings"
            )
        path = sgm
    return "lora_unet_" + path.replace(".", "_")


def _te_key(prefix: str, text_encoder: nn.Module, path: str) -> str:
    """Classic CLIP naming: insert `text_model` where transformers 5 flattened CLIPTextModel."""
    if not hasattr(text_encoder, "text_model"):
        path = "text_model." + path
    return f"{prefix}_" + path.replace(".", "_")


def _check_prefixes(text_encoders: dict | None) -> dict:
    text_encoders = text_encoders or {}
    bad = [p for p in text_encoders if p not in TEXT_ENCODER_PREFIXES]
    if bad:
        raise UserError(f"text_encoders keys {bad} are not LoRA prefixes; use {list(TEXT_ENCODER_PREFIXES)}")
    return text_encoders


def _key_table(unet: nn.Module, text_encoders: dict) -> dict[str, tuple[nn.Module, str]]:
    """kohya module name -> (model, layer path) for every layer a file may target.

    UNet layers answer to both their diffusers and their sgm name, so LDM-named SD1 files (trained in
    ComfyUI) and diffusers-named SDXL files load too; an LDM-named UNet (ComfyUI's, with `num_res_blocks`)
    answers to its diffusers names as well, so diffusers-named files (e.g. the published LCM-LoRAs) load into it.
    """
    table = {}
    config = getattr(unet, "config", None)
    blocks = getattr(unet, "num_res_blocks", None) if config is None else None
    blocks = set(blocks) if isinstance(blocks, (list, tuple)) else {blocks}
    per_block = blocks.pop() if len(blocks) == 1 else None
    for path in _adaptable_layers(unet):
        names = {path, _sgm_path(path, config) if config is not None else None,
                 ldm_unet_path_to_diffusers(path, per_block) if per_block else None} - {None}
        for name in names:
            table["lora_unet_" + name.replace(".", "_")] = (unet, path)
    for prefix, te in text_encoders.items():
        for path in _adaptable_layers(te):
            table[_te_key(prefix, te, path)] = (te, path)
    return table


# ---------------------------------------------------------------- export


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def lora_state_dict(unet: nn.Module, text_encoders: dict | None = None, adapter_name: str = "default") -> dict:
    """The adapter as a kohya-layout state dict (the file contract): detached contiguous CPU copies."""
    models = [(unet, lambda path: _unet_key(unet, path))]
    for prefix, te in _check_prefixes(text_encoders).items():
        models.append((te, lambda path, prefix=prefix, te=te: _te_key(prefix, te, path)))
    state = {}
    for model, key_of in models:
        layers = _lora_layers(model, adapter_name)
        if not layers:
            raise UserError(
                f"{type(model).__name__} has no LoRA adapter named {adapter_name!r}; inject_lora or load_lora first"
            )
        for path, layer in layers:
            key = key_of(path)
            state[f"{key}.{_DOWN}"] = _cpu(layer.lora_A[adapter_name].weight)
            state[f"{key}.{_UP}"] = _cpu(layer.lora_B[adapter_name].weight)
            state[f"{key}.{_ALPHA}"] = torch.tensor(float(layer.lora_alpha[adapter_name]), dtype=torch.float32)
    return state


def lora_architecture(unet: nn.Module) -> str:
    """The modelspec architecture of a LoRA for this UNet: SDXL by its text_time embedding, SD2 by its
    1024-wide cross-attention (OpenCLIP-H), else SD1."""
    if _is_sdxl(unet):
        return "stable-diffusion-xl-v1-base/lora"
    if getattr(getattr(unet, "config", None), "cross_attention_dim", None) == 1024:
        return "stable-diffusion-v2-768-v/lora"
    return "stable-diffusion-v1/lora"


def lora_metadata(
    *, base_model, architecture, method, reward, config: dict, rank, alpha, resolution, prediction_type, title
) -> dict[str, str]:
    """safetensors metadata: modelspec (ComfyUI/hubs), kohya `ss_*` (A1111/Civitai) and our run record."""
    import comfy_rft

    if architecture not in ARCHITECTURES:
        raise UserError(
            f"unknown LoRA architecture {architecture!r}; use lora_architecture(unet) or one of {list(ARCHITECTURES)}"
        )
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": str(title),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction_type, str(prediction_type)),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": ARCHITECTURES[architecture],
        "comfy_rft.base_model": str(base_model),
        "comfy_rft.method": str(method),
        "comfy_rft.reward": str(reward),
        "comfy_rft.version": str(getattr(comfy_rft, "__version__", "0.1.0")),
        "comfy_rft.config": json.dumps(config, sort_keys=True, default=str),
    }


def save_lora(path, state_dict: dict, metadata: dict[str, str] | None) -> Path:
    """Write one .safetensors atomically: a reader never sees a half-written LoRA, even after a crash."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save(state_dict, metadata=metadata)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- import


_CONTRACT = (
    "a LoRA file must be a .safetensors file with kohya keys lora_unet_<layer>.lora_down.weight / "
    ".lora_up.weight / .alpha (lora_te*_<layer> for text encoders)"
)


def _require_lora_keys(state_dict: dict, source: str) -> None:
    if not any(k.startswith(("lora_unet_", "lora_te")) for k in state_dict):
        raise UserError(f"{source} holds no LoRA weights (found e.g. {sorted(state_dict)[:3]}); {_CONTRACT}")


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file: (state dict, metadata)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} not found (or not a file); pass the path of a .safetensors LoRA file")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); {_CONTRACT}") from e
    _require_lora_keys(state, str(path))
    return state, metadata


def _group(state_dict: dict, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya module name: {"lora_down.weight": .., "lora_up.weight": .., "alpha": ..}}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = tensor
    for name, parts in groups.items():
        if set(parts) - {_DOWN, _UP, _ALPHA} or not {_DOWN, _UP} <= set(parts):
            raise UserError(
                f"{source}: layer {name} has parts {sorted(parts)}, not a plain LoRA (LoHa/LoKr/DoRA are not "
                f"supported); {_CONTRACT}"
            )
    return groups


def _pattern(path: str) -> str:
    """An exact-path key for peft's rank/alpha patterns (regexes matched against layer-path suffixes)."""
    return "^" + re.escape(path)


def _check_shapes(model: nn.Module, path: str, parts: dict, source: str) -> None:
    """lora_down is (rank, *base in-dims), lora_up is (base out, rank, 1, ...), as peft builds them."""
    layer = model.get_submodule(path)
    weight = (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight
    rank = parts[_DOWN].shape[0]
    expected = {_DOWN: (rank, *weight.shape[1:]), _UP: (weight.shape[0], rank, *[1] * (weight.dim() - 2))}
    for key, shape in expected.items():
        if tuple(parts[key].shape) != shape:
            raise UserError(
                f"{source}: {key} of layer {path} has shape {tuple(parts[key].shape)} but this model needs {shape}; "
                "the LoRA was made for another model - load it with the model it was trained for"
            )


def _most_common(values: dict):
    return Counter(values.values()).most_common(1)[0][0]


def load_lora(
    unet: nn.Module,
    path_or_state,
    text_encoders: dict | None = None,
    adapter_name: str = "default",
    strength: float = 1.0,
    trainable: bool = False,
) -> list[nn.Parameter]:
    """Load a kohya-layout LoRA as a new adapter (rank/alpha/targets from the file) and return its parameters.

    A file written by `lora_state_dict` comes back bit-exactly. Text-encoder keys are applied only when
    `text_encoders` (e.g. {"lora_te1": te1, "lora_te2": te2}) is given, and ignored otherwise.
    """
    from peft import LoraConfig

    text_encoders = _check_prefixes(text_encoders)
    if isinstance(path_or_state, dict):
        state, source = path_or_state, "the LoRA state dict"
        _require_lora_keys(state, source)
    else:
        state, _ = read_lora(path_or_state)
        source = str(path_or_state)
    groups = _group(state, source)
    if not text_encoders:
        groups = {n: g for n, g in groups.items() if n.startswith("lora_unet_")}
    table = _key_table(unet, text_encoders)
    unmatched = sorted(n for n in groups if n not in table)
    if unmatched:
        raise UserError(
            f"{source}: {len(unmatched)} of {len(groups)} LoRA layers match no layer of this model "
            f"(e.g. {unmatched[:3]}); it was made for another architecture - load it with the model it was "
            "trained for (or pass the right text_encoders)"
        )

    per_model: dict[int, tuple[nn.Module, dict[str, dict]]] = {}
    for name, parts in groups.items():
        model, path = table[name]
        per_model.setdefault(id(model), (model, {}))[1][path] = parts
    if not per_model:
        raise UserError(f"{source} has only text-encoder layers; pass text_encoders to load them")
    for model, layers in per_model.values():  # check everything before touching any model
        _require_new_adapter(model, adapter_name)
        for path, parts in layers.items():
            _check_shapes(model, path, parts, source)

    params = []
    for model, layers in per_model.values():
        ranks = {p: parts[_DOWN].shape[0] for p, parts in layers.items()}
        alphas = {p: float(parts[_ALPHA]) if _ALPHA in parts else float(ranks[p]) for p, parts in layers.items()}
        r, alpha = _most_common(ranks), _most_common(alphas)
        config = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=list(layers),
            rank_pattern={_pattern(p): v for p, v in ranks.items() if v != r},
            alpha_pattern={_pattern(p): v for p, v in alphas.items() if v != alpha},
        )
        _add_adapter(model, config, adapter_name)
        params += _adapter_params(model, adapter_name, trainable)
        with torch.no_grad():
            for path, layer in _lora_layers(model, adapter_name):
                layer.lora_A[adapter_name].weight.copy_(layers[path][_DOWN])
                layer.lora_B[adapter_name].weight.copy_(layers[path][_UP])
        set_lora_strength(model, strength, adapter_name)
    return params


# ---------------------------------------------------------------- inference


def set_lora_strength(unet: nn.Module, strength: float, adapter_name: str = "default") -> None:
    """Scale the adapter's contribution (ComfyUI's strength): 0 gives the base model, 1 the trained LoRA."""
    layers = _lora_layers(unet, adapter_name)
    if not layers:
        raise UserError(f"{type(unet).__name__} has no LoRA adapter named {adapter_name!r}; load_lora first")
    for _, layer in layers:
        layer.set_scale(adapter_name, strength)


def mix_loras(unet: nn.Module, loras, text_encoders: dict | None = None, adapter_prefix: str = "mix") -> list[str]:
    """Load each (path, weight) as adapter `<prefix>_<i>` and run them all at once with those weights."""
    from peft.tuners.lora import LoraLayer

    loras = list(loras)
    if not loras:
        raise UserError("mix_loras needs at least one (path, weight) pair")
    names = [f"{adapter_prefix}_{i}" for i in range(len(loras))]
    for name, (source, _) in zip(names, loras):
        load_lora(unet, source, text_encoders, adapter_name=name)
    for model in [unet, *_check_prefixes(text_encoders).values()]:
        for layer in model.modules():
            if isinstance(layer, LoraLayer):  # every layer, so adapters outside the mix switch off
                layer.set_adapter(names)
                layer.requires_grad_(False)  # set_adapter makes active adapters trainable; a mix is for inference
                for name, (_, weight) in zip(names, loras):
                    layer.set_scale(name, weight)
    return names


@contextlib.contextmanager
def only_adapters(module: nn.Module, names=()):
    """Run `module` with only the adapters `names` switched on; `()` switches every adapter off (the base model).

    The same module serves the policy (the run's LoRA on), the reference (all off, no second copy of the
    weights) and an extra frozen adapter such as an LCM-LoRA (only it on). On exit every adapter layer gets
    back its active adapters, its on/off state and each adapter weight its `requires_grad` (peft's switches
    change them); layers created inside the block are left with no adapter on. Inside `torch.utils.checkpoint`,
    enter it in the checkpointed function, so the recomputation in backward sees the same adapters.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    def switch(layer, active, disabled=False):
        if layer.disable_adapters != disabled:
            layer.enable_adapters(not disabled)
        layer.set_adapter(list(active), inference_mode=True)

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
    flags = [(p, p.requires_grad) for layer in layers for name in layer.adapter_layer_names
             for p in getattr(layer, name).parameters()]
    try:
        for layer in layers:
            switch(layer, names)
        yield
    finally:
        known = {id(layer) for layer in layers}
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer) and id(layer) not in known:
                switch(layer, ())
        for layer, active, disabled in saved:
            switch(layer, active, disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------- LDM (ComfyUI) names -> diffusers names

_RESNET_FROM_SGM = {v: k for k, v in _SGM_RESNET.items()}
_TOP_FROM_SGM = {v: k for k, v in _SGM_TOP.items()}
_MID_FROM_SGM = {v: k for k, v in _SGM_MID.items()}


def _resnet_rest(rest: list[str]) -> list[str] | None:
    for sgm, diffusers in _RESNET_FROM_SGM.items():
        n = sgm.count(".") + 1
        if ".".join(rest[:n]) == sgm:
            return [diffusers, *rest[n:]]
    return None


def ldm_unet_path_to_diffusers(path: str, layers_per_block: int) -> str | None:
    """The diffusers path of a layer of an LDM-named SD1.x/SD2/SDXL UNet (ComfyUI's `diffusion_model` names).

    The inverse of the diffusers -> LDM mapping the export uses for SDXL (`_sgm_path`): `layers_per_block`
    is the UNet's resnets per down block (ComfyUI's `num_res_blocks`; 2 for SD1.x/SD2/SDXL). An up block's
    upsampler is `output_blocks.<k>.1` when the block has no attention (its layer is `conv`), `.2` otherwise.
    None when the layer has no diffusers counterpart.
    """
    for sgm, diffusers in _TOP_FROM_SGM.items():
        if path == sgm or path.startswith(sgm + "."):
            return diffusers + path[len(sgm):]
    parts = path.split(".")
    n = layers_per_block + 1
    if parts[0] == "middle_block":  # middle_block.<0|1|2>.<rest>
        try:
            kind, j = _MID_FROM_SGM[int(parts[1])]
        except (IndexError, ValueError, KeyError):
            return None
        rest = parts[2:] if kind == "attentions" else _resnet_rest(parts[2:])
        return None if rest is None else ".".join(["mid_block", kind, str(j), *rest])
    try:
        group, k, m, rest = parts[0], int(parts[1]), int(parts[2]), parts[3:]
    except (IndexError, ValueError):
        return None
    if group == "input_blocks" and k >= 1:
        i, j = (k - 1) // n, (k - 1) % n
        if j == n - 1:  # the down block's downsampler: input_blocks.<k>.0.op
            if m != 0 or not rest or rest[0] != "op":
                return None
            return ".".join(["down_blocks", str(i), "downsamplers", "0", "conv", *rest[1:]])
        if m == 0:
            rest = _resnet_rest(rest)
            return None if rest is None else ".".join(["down_blocks", str(i), "resnets", str(j), *rest])
        if m == 1:
            return ".".join(["down_blocks", str(i), "attentions", str(j), *rest])
        return None
    if group == "output_blocks":
        i, j = k // n, k % n
        if m == 0:
            rest = _resnet_rest(rest)
            return None if rest is None else ".".join(["up_blocks", str(i), "resnets", str(j), *rest])
        if j == n - 1 and (m == 2 or (m == 1 and rest[:1] == ["conv"])):
            return ".".join(["up_blocks", str(i), "upsamplers", "0", *rest])
        if m == 1:
            return ".".join(["up_blocks", str(i), "attentions", str(j), *rest])
    return None


def kohya_module_name(prefix: str, path: str) -> str:
    """The kohya module name of a layer path: `<prefix>_<path with . -> _>` (e.g. prefix lora_unet)."""
    return f"{prefix}_" + path.replace(".", "_")


def ldm_to_diffusers_lora_names(ldm_paths, layers_per_block: int) -> dict[str, str]:
    """{kohya name from the LDM path: kohya name from the diffusers path} for the given UNet layer paths.

    Raises UserError naming the layers that have no diffusers name (so no file is half renamed).
    """
    mapping, missing = {}, []
    for path in ldm_paths:
        diffusers = ldm_unet_path_to_diffusers(path, layers_per_block)
        if diffusers is None:
            missing.append(path)
        else:
            mapping[kohya_module_name("lora_unet", path)] = kohya_module_name("lora_unet", diffusers)
    if missing:
        raise UserError(f"{len(missing)} UNet layer(s) have no diffusers name (e.g. {missing[:3]}), so a diffusers-"
                        f"named file cannot hold them; target layers inside the down/mid/up blocks")
    return mapping


def rename_lora_modules(state_dict: dict, mapping: dict[str, str]) -> dict:
    """The state dict with each kohya module name (the part before the first '.') renamed by `mapping`;
    names not in `mapping` are kept."""
    out = {}
    for key, tensor in state_dict.items():
        name, dot, suffix = key.partition(".")
        new_key = mapping.get(name, name) + dot + suffix
        if new_key in out:
            raise UserError(f"renaming LoRA keys maps two layers to {new_key}")
        out[new_key] = tensor
    return out
