"""A thin, ComfyUI-free description of every node: inputs, outputs, tooltips, and the function that runs it.

Each node is a `NodeDef`. `nodes/comfy_v3.py` renders it into a ComfyUI V3 class (`comfy_api.latest.io`)
when ComfyUI loads the pack; tests render it without ComfyUI (`object_info`, the V1-style dictionary
ComfyUI's `/object_info` shows for a V3 node) and check it. Nothing here imports torch.

Config dataclasses become widgets through `config_inputs`, from the same `config_fields` that make the
CLI flags, so a method's settings, defaults, bounds and help texts live in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
INT_MAX = 2**31 - 1
SEED_MAX = 2**53 - 1  # a JavaScript number holds integers exactly up to here
FLOAT_MAX = 1e9

# The pack's own socket types: what flows along a link between our nodes.
REWARD = "RFT_REWARD"  # a comfy_rft Reward (nn.Module): images [B,3,H,W] in [0,1] + prompts -> scores [B]
PROMPTS = "RFT_PROMPTS"  # list[str]
LORA = "RFT_LORA"  # nodes.payloads.LoraPayload: kohya state dict (the file contract) + safetensors metadata
TRAINING_LOG = "RFT_TRAINING_LOG"  # nodes.payloads.TrainingLog: per-step metrics, evaluations, run folder


class ComboName(str):
    """The type string of an output that carries a combo value (a LoRA file name).

    ComfyUI compares a link's output type with the input's type before running a prompt; a combo
    input's type is its list of choices (V1 nodes such as LoraLoader) or "COMBO" (V3). This str says
    "COMBO" to the frontend and matches those inputs in that check (the `__ne__` convention ComfyUI's
    `validate_node_input` documents), so Save LoRA's file name can feed the stock loader in the same run.
    """

    def __ne__(self, other):
        return not (isinstance(other, (list, tuple)) or str.__eq__(self, other))

    __hash__ = str.__hash__


@dataclass(frozen=True)
class Input:
    """One input: a widget (INT, FLOAT, STRING, BOOLEAN, COMBO) or a socket of another type."""

    name: str
    type: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    options: tuple | Callable[[], list] | None = None  # COMBO choices, or a function listing them (files)
    multiline: bool = False
    optional: bool = False
    display_name: str | None = None
    # INT only. False keeps the frontend from adding its "control after generate" widget, which it adds to any
    # INT called seed unless told otherwise (and set to "randomize": a trainer would then retrain every run).
    control_after_generate: bool | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def choices(self) -> list:
        if self.options is None:
            return []
        return list(self.options()) if callable(self.options) else list(self.options)


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    tooltip: str


@dataclass
class Result:
    """What a node's function returns: output values in order, plus what the UI shows."""

    values: tuple = ()
    text: list[str] = field(default_factory=list)
    images: Any = None  # IMAGE tensor [B,H,W,3] shown as a preview


@dataclass
class NodeDef:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: list[Input]
    outputs: list[Output]
    run: Callable[..., Result]
    output_node: bool = False
    unavailable: str | None = None  # why the node cannot run here (a missing optional dependency)


def float_step(default: float) -> float:
    """A widget step fine enough to show the default exactly and a tenth of its magnitude."""
    if not default:
        return 0.01
    step = 10.0 ** (math.floor(math.log10(abs(default))) - 1)
    text = f"{default:.10f}".rstrip("0")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return min(step, 10.0 ** -decimals) if decimals else step


def config_inputs(config_cls, exclude: set[str] = frozenset(), notes: dict[str, str] | None = None) -> list[Input]:
    """One widget per option of a Config dataclass: its default, bounds, choices and help text as tooltip
    (plus `notes[name]`, what the option means in ComfyUI where that differs from the command line)."""
    from comfy_rft.config import config_fields

    inputs = []
    for f, typ in config_fields(config_cls):
        if f.name in exclude:
            continue
        meta, default = f.metadata, f.default
        tooltip = meta.get("help", "") + ((" " + notes[f.name]) if notes and f.name in notes else "")
        lo, hi = meta.get("min"), meta.get("max")
        if meta.get("choices"):
            inputs.append(Input(f.name, "COMBO", tooltip, default=default, options=tuple(meta["choices"])))
        elif typ is bool:
            inputs.append(Input(f.name, "BOOLEAN", tooltip, default=default))
        elif typ is int:
            top = SEED_MAX if f.name == "seed" else INT_MAX
            inputs.append(Input(f.name, "INT", tooltip, default=default, min=int(lo) if lo is not None else -top,
                                max=int(hi) if hi is not None else top, step=1,
                                control_after_generate=False if f.name in ("seed", "noise_seed") else None))
        elif typ is float:
            step = float_step(default)
            inputs.append(Input(f.name, "FLOAT", tooltip, default=default,
                                min=float(lo) if lo is not None else -FLOAT_MAX,
                                max=float(hi) if hi is not None else FLOAT_MAX, step=step, round=1e-10))
        elif typ is str:
            inputs.append(Input(f.name, "STRING", tooltip, default=default))
        else:
            raise TypeError(f"{config_cls.__name__}.{f.name}: no widget for type {typ!r}")
    return inputs


def object_info(node: NodeDef) -> dict:
    """The node as ComfyUI's `/object_info` shows a V3 node (V1-style dictionary), built without ComfyUI."""
    required, optional = {}, {}
    for i in node.inputs:
        opts: dict[str, Any] = {"tooltip": i.tooltip}
        if i.display_name:
            opts["display_name"] = i.display_name
        if i.is_widget:
            if i.default is not None:
                opts["default"] = i.default
            for key in ("min", "max", "step", "round", "control_after_generate"):
                if getattr(i, key) is not None:
                    opts[key] = getattr(i, key)
            if i.type == "STRING" and i.multiline:
                opts["multiline"] = True
            if i.type == "COMBO":
                opts["options"] = i.choices()
        (optional if i.optional else required)[i.name] = (i.type, opts)
    return {
        "input": {"required": required, **({"optional": optional} if optional else {})},
        "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
        "output": [o.type for o in node.outputs],
        "output_name": [o.name for o in node.outputs],
        "output_tooltips": [o.tooltip for o in node.outputs],
        "name": node.node_id,
        "display_name": node.display_name,
        "description": node.description,
        "category": node.category,
        "output_node": node.output_node,
    }


def widget_names(info: dict) -> list[str]:
    """The names of a node's widgets in the order a UI-format workflow stores their values.

    Widgets follow the input order (required, then optional); an INT widget with
    `control_after_generate` (by default, one called seed or noise_seed, as the frontend does) is followed
    by its "fixed/randomize" value.
    """
    names = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            typ, opts = info["input"][section][name]
            if isinstance(typ, list) or typ in WIDGET_TYPES:
                names.append(name)
                control = opts.get("control_after_generate")
                if typ == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
                    names.append(f"{name}:control_after_generate")
    return names
