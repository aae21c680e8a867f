"""Built-in rewards by name, and the reward spec language.

A spec is one or more terms joined by `+`:  `name[(key=value, ...)][@weight]`, e.g.
`aesthetic@0.7+hpsv2.1@0.3`, `aesthetic(head=/models/my-head.pth, target=6.5)`,
`mypackage.rewards:redness(differentiable=true)`. Options every term takes: `target=T` (score
−|r − T|), `normalize=prompt` (running per-prompt standardisation), `rho=R` (the perturbation-robust
reward gradient, `robust=adversarial|smooth`, `samples=N`). Other options go to the reward itself
(file paths, versions). A name with `:` is a user callable `module:function`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from ..errors import UserError
from .base import Reward


@dataclass(frozen=True)
class Builtin:
    """A built-in reward: its factory (imported only when used), and what a user needs to know."""

    factory: str  # "module:callable", relative to comfy_rft.rewards
    summary: str
    files: str  # what must be on disk, and where it is published
    differentiable: bool = True


BUILTINS: dict[str, Builtin] = {
    "brightness": Builtin("simple:Brightness", "mean luma in [0, 1]", "none"),
    "jpeg": Builtin("simple:JpegCompressibility", "−JPEG size in kB at quality 95 (compressibility)", "none",
                    differentiable=False),
    "jpeg-incompressibility": Builtin("simple:JpegIncompressibility", "+JPEG size in kB at quality 95", "none",
                                      differentiable=False),
    "aesthetic": Builtin("clip_rewards:aesthetic", "LAION aesthetic predictor v2 (CLIP ViT-L/14 + MLP), 1-10 scale",
                         "clip-vit-large-patch14/ (config.json, model.safetensors; huggingface.co/openai/"
                         "clip-vit-large-patch14) + sac+logos+ava1-l14-linearMSE.pth (or ava+logos-l14-reluMSE.pth; "
                         "github.com/christophschuhmann/improved-aesthetic-predictor)"),
    "hpsv2": Builtin("clip_rewards:hpsv2", "HPSv2 human preference score: cos(image, prompt), ~0.20-0.35",
                     "HPS_v2_compressed.pt (huggingface.co/xswu/HPSv2; converted once to HPS_v2_compressed.hf/ "
                     "beside it) + CLIP-ViT-H-14-laion2B-s32B-b79K/ tokenizer files "
                     "(huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    "hpsv2.1": Builtin("clip_rewards:hpsv2_1", "HPSv2.1 human preference score: cos(image, prompt), ~0.20-0.35",
                       "HPS_v2.1_compressed.pt (huggingface.co/xswu/HPSv2; converted once to HPS_v2.1_compressed.hf/ "
                       "beside it) + CLIP-ViT-H-14-laion2B-s32B-b79K/ tokenizer files "
                       "(huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    "pickscore": Builtin("clip_rewards:pickscore", "PickScore v1: 100 * cos(image, prompt), ~17-24",
                         "PickScore_v1/ (CLIPModel folder; huggingface.co/yuvalkirstain/PickScore_v1) + "
                         "CLIP-ViT-H-14-laion2B-s32B-b79K/ tokenizer files unless PickScore_v1/ has them "
                         "(huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    "clipscore": Builtin("clip_rewards:clipscore", "CLIP score: 100 * max(cos(image, prompt), 0), ~20-35 (ViT-L/14)",
                         "clip-vit-large-patch14/ with tokenizer files (huggingface.co/openai/clip-vit-large-patch14), "
                         "or any CLIP folder via clipscore(model=PATH)"),
    "imagereward": Builtin("imagereward:imagereward", "ImageReward v1.0 human-preference score (standardised, ≈ −2…+2)",
                           "ImageReward.pt + med_config.json (huggingface.co/THUDM/ImageReward, also zai-org/ImageReward) "
                           "and a bert-base-uncased folder with vocab.txt (huggingface.co/google-bert/bert-base-uncased)"),
    "ocr": Builtin("ocr:OcrTextMatch", "1 when the image shows the prompt's quoted text (or text=...), "
                   "less by edit distance", 'none: the OCR models ship in the optional extra, '
                   'pip install "comfy-rft[ocr]"', differentiable=False),
    "toy-proxy": Builtin("toy:proxy", "toy world (32x32 shapes): caption match + big shapes, as one small "
                         "classifier sees it, ~0-1 (a hackable proxy)", "none: ships with the package"),
    "toy-gold": Builtin("toy:gold", "toy world: caption match + big shapes, as a 5-classifier augmented ensemble "
                        "sees it, 0-1 (gold)", "none: ships with the package"),
    "toy-check": Builtin("toy:ToyCheck", "toy world: caption match + big shapes, as a program reads the pixels, "
                         "0-1 (gold)", "none", differentiable=False),
}

GENERIC_OPTIONS = ("target", "normalize", "rho", "robust", "samples")
_TERM = re.compile(r"^(?P<name>[\w.\-/:]+)\s*(?:\((?P<options>.*)\))?\s*(?:@\s*(?P<weight>[-+]?[\d.]+(?:e[-+]?\d+)?))?$",
                   re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Term:
    name: str
    options: dict[str, str]
    weight: float = 1.0


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split at `separator` outside parentheses (file names such as sac+logos+ava1.pth contain '+')."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_spec(spec: str) -> list[Term]:
    """Parse a reward spec into terms; a malformed spec is a UserError that shows the syntax."""
    syntax = "name[(key=value, ...)][@weight] joined by '+', e.g. aesthetic@0.7+hpsv2.1@0.3"
    if not spec or not spec.strip():
        raise UserError(f"empty reward spec; write {syntax}")
    terms = []
    for raw in _split_top_level(spec.strip(), "+"):
        match = _TERM.match(raw)
        if not raw or not match:
            raise UserError(f"cannot read reward term {raw!r} in {spec!r}; write {syntax}")
        options = {}
        for item in _split_top_level(match["options"] or "", ","):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UserError(f"reward option {item!r} in {raw!r} must be key=value")
            options[key.strip().lower()] = value.strip()
        terms.append(Term(match["name"].lower() if ":" not in match["name"] else match["name"], options,
                          float(match["weight"]) if match["weight"] else 1.0))
    return terms


def reward_names() -> list[str]:
    return sorted(BUILTINS)


def _build_term(term: Term) -> Reward:
    options = dict(term.options)
    generic = {k: options.pop(k) for k in GENERIC_OPTIONS if k in options}
    if ":" in term.name:
        from .user import load_callable

        flag = options.pop("differentiable", None)
        reward = load_callable(term.name, None if flag is None else flag.lower() in ("1", "true", "yes"))
    elif term.name in BUILTINS:
        module_name, _, attr = BUILTINS[term.name].factory.partition(":")
        factory = getattr(importlib.import_module(f"{__package__}.{module_name}"), attr)
        try:
            reward = factory(**options)
        except TypeError as err:
            raise UserError(f"reward {term.name}: unknown option(s) {sorted(options)} ({err})") from None
    else:
        raise UserError(f"unknown reward {term.name!r}; built-in rewards: {', '.join(reward_names())}; or give "
                        f"your own function as module:function (see `comfy-rft rewards`)")
    reward = reward.freeze()
    return _apply_generic(reward, generic)


def _apply_generic(reward: Reward, generic: dict[str, str]) -> Reward:
    from .combine import PerPromptNormalized, Target
    from .robust import RobustReward

    try:
        if "normalize" in generic:
            if generic["normalize"] != "prompt":
                raise UserError(f"normalize={generic['normalize']} is not known; use normalize=prompt")
            reward = PerPromptNormalized(reward)
        if "target" in generic:
            reward = Target(reward, float(generic["target"]))
        if "rho" in generic or "robust" in generic:
            reward = RobustReward(reward, rho=float(generic.get("rho", 0.01)), mode=generic.get("robust", "adversarial"),
                                  samples=int(generic.get("samples", 4)))
    except ValueError as err:
        raise UserError(f"bad reward option value for {reward.name}: {err}") from None
    return reward


def load_reward(spec: str) -> Reward:
    """The reward a spec describes (a single term, or a weighted sum)."""
    from .combine import WeightedSum

    terms = parse_spec(spec)
    rewards = [_build_term(t) for t in terms]
    if len(rewards) == 1 and terms[0].weight == 1.0:
        return rewards[0]
    return WeightedSum(rewards, [t.weight for t in terms]).freeze()
