"""LaSRO's learned surrogate reward R_ψ(z, c): a differentiable reward over latents, trained on pairs.

LaSRO (Jia et al., arXiv 2411.15247, CVPR 2025; research/algorithms.md §5, §8.6) makes any reward,
including a non-differentiable one, usable by gradient methods: a surrogate is trained with a
Bradley–Terry loss on samples of the same prompt ranked by the true reward, and the generator
follows the surrogate's gradient.

The surrogate here:
- **backbone**: a *copy* of the base model's UNet encoder (conv_in, time (+ SDXL added) embedding, down
  blocks, mid block; `depth` levels of it), text-conditioned through cross-attention on the prompt
  embeddings, evaluated at a fixed small timestep t_s on √ᾱ_{t_s}·z (the noise-free mean of
  q(z_{t_s} | z): a reward must be deterministic). It is a copy, made without the run's LoRA, so the
  generator's adapter never leaks into the reward, and parts of it can be trained (`tune`) without
  touching the base model. It costs the memory of the encoder half of the UNet once more (the paper's
  surrogate is a separate model too); sharing the UNet with its adapter switched off would save that,
  but could train no encoder part and would need the switch inside every checkpointed call.
- **head**: for each encoder feature map (conv_in, every down level's output, the mid block) a 3×3
  conv + SiLU, global average pooling, then an MLP to one scalar. No normalisation layer: a per-sample
  norm would erase contrast, which rewards such as JPEG size depend on. Global pooling makes it
  translation-invariant (on the tiny model a 2×2 grid pooling learned JPEG incompressibility worse).
  Multi-scale pooling is our choice; the paper's head ("a CNN head on the UNet encoder") is unverified
  (algorithms.md §10).

`bradley_terry_loss`, `pair_accuracy` and the safetensors file (`save` / `load_surrogate`) are here
too; the online training schedule is the trainer's (trainers/lasro.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import LatentReward

SURROGATE_KIND = "comfy-rft/lasro-surrogate"
FORMAT_VERSION = "1"
TUNE_CHOICES = ("head", "head+last", "all")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy without any peft adapter (the run's LoRA must not leak into the copy), frozen, eval mode."""
    from ..lora import remove_adapters

    clone = copy.deepcopy(module)
    remove_adapters(clone)
    return clone.requires_grad_(False).eval()


class UNetEncoder(nn.Module):
    """A frozen copy of a UNet's encoder half: x_t, t, cond -> [conv_in output, then one feature map per level
    read: each down level's output, then the mid block's], as the UNet itself computes them.

    `depth` limits what is read (and copied): 0 = conv_in only, k = also the first k down levels, -1 = every
    level and the mid block (the whole encoder). Subclasses give the blocks, the time (and added) embedding
    and how one level runs: `DiffusersUNetEncoder` here, the ComfyUI (LDM) twin in nodes/comfy_backend.py.
    Both name the same levels, so a head trained on one reads the other's features.
    """

    def __init__(self, conv_in: nn.Module, levels: list[nn.Module], level_channels: list[int], depth: int):
        super().__init__()
        if not -1 <= depth <= len(levels):
            raise UserError(f"surrogate depth {depth}: this UNet's encoder has {len(levels)} levels after conv_in "
                            f"({len(levels) - 1} down levels and the mid block); use 0..{len(levels)}, or -1 for all")
        self.depth = len(levels) if depth == -1 else depth
        self.depth_option = -1 if self.depth == len(levels) else depth  # as the user writes it, whatever the UNet
        self.conv_in = frozen_copy(conv_in)
        self.levels = nn.ModuleList(frozen_copy(level) for level in levels[:self.depth])
        self.feature_channels = [self.conv_in.out_channels, *level_channels[:self.depth]]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.conv_in.parameters()).dtype

    def tunable(self, tune: str) -> list[nn.Module]:
        """The parts `tune` trains besides the head: none, the deepest level read, or the whole copy."""
        last = self.levels[-1] if len(self.levels) else self.conv_in
        return {"head": [], "head+last": [last], "all": [self]}[tune]

    def embedding(self, x: torch.Tensor, t: int, cond) -> torch.Tensor:
        raise NotImplementedError

    def run_level(self, level: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: int, cond) -> list[torch.Tensor]:
        h = self.conv_in(x.to(self.dtype))
        features = [h]
        if self.depth:
            emb, context = self.embedding(x, t, cond), cond.embeds.to(self.dtype)
            for level in self.levels:
                h = self.run_level(level, h, emb, context)
                features.append(h)
        return features


class DiffusersUNetEncoder(UNetEncoder):
    """The encoder of a diffusers `UNet2DConditionModel` (SD1.x/SD2/SDXL): levels are its down blocks and mid block."""

    def __init__(self, unet: nn.Module, depth: int = -1):
        config = unet.config
        unsupported = {k: getattr(config, k, None) for k in ("class_embed_type", "encoder_hid_dim_type")
                       if getattr(config, k, None) is not None}
        if config.addition_embed_type not in (None, "text_time"):
            unsupported["addition_embed_type"] = config.addition_embed_type
        if getattr(unet, "time_embed_act", None) is not None or unet.mid_block is None:
            unsupported["time_embed_act / mid_block"] = "custom"
        if unsupported:
            raise UserError(f"LaSRO's surrogate reads SD1.x/SD2/SDXL UNet encoders; this UNet has {unsupported}")
        levels = [*unet.down_blocks, unet.mid_block]
        super().__init__(unet.conv_in, levels, [level.resnets[-1].out_channels for level in levels], depth)
        self.addition_embed_type = config.addition_embed_type
        self.time_proj = frozen_copy(unet.time_proj)
        self.time_embedding = frozen_copy(unet.time_embedding)
        if self.addition_embed_type == "text_time":
            self.add_time_proj = frozen_copy(unet.add_time_proj)
            self.add_embedding = frozen_copy(unet.add_embedding)

    def embedding(self, x, t, cond):
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        if self.addition_embed_type == "text_time":
            time_embeds = self.add_time_proj(cond.time_ids.flatten()).reshape(x.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([cond.pooled, time_embeds], dim=-1).to(self.dtype))
        return emb

    def run_level(self, level, h, emb, context):
        cross = {"encoder_hidden_states": context} if getattr(level, "has_cross_attention", False) else {}
        if hasattr(level, "downsamplers"):  # a down block returns (h, skip connections)
            return level(hidden_states=h, temb=emb, **cross)[0]
        return level(h, emb, **cross)


class PooledHead(nn.Module):
    """Per feature map: 3×3 conv + SiLU + global average pool; concatenated, then an MLP to one scalar."""

    def __init__(self, feature_channels: list[int], width: int):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.SiLU())
                                      for c in feature_channels)
        self.mlp = nn.Sequential(nn.Linear(width * len(feature_channels), width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        pooled = [branch(f.float()).mean(dim=(2, 3)) for branch, f in zip(self.branches, features)]
        return self.mlp(torch.cat(pooled, dim=1)).squeeze(1)


def fingerprint(module: nn.Module) -> str:
    """A short hash of a module's parameter names, shapes and (a sample of) values: tells models apart."""
    digest = hashlib.sha256()
    for name, p in module.state_dict().items():
        flat = p.detach().flatten()
        digest.update(f"{name}:{tuple(p.shape)}".encode())
        digest.update(torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class Surrogate(LatentReward):
    """R_ψ(z, c) over the model's latents: the UNet encoder at t_s, then a pooled head (see the module doc).

    `encode(prompts, latents) -> Cond` gives the conditioning when `forward` is not handed one (the
    backend's cached prompt encoding). `base_fingerprint` identifies the encoder it was built from, so a
    saved surrogate cannot be loaded onto another model.
    """

    name = "surrogate"

    def __init__(self, encoder: nn.Module, encode: Callable, *, timestep: int, alpha_bar: float, width: int = 64,
                 tune: str = "head", base_model: str = ""):
        super().__init__()
        if tune not in TUNE_CHOICES:
            raise UserError(f"surrogate tune {tune!r}: choose one of {', '.join(TUNE_CHOICES)}")
        self.encoder = encoder
        self.encode = encode
        self.timestep, self.alpha_bar, self.width, self.tune = int(timestep), float(alpha_bar), int(width), tune
        self.base_model = base_model
        self.base_fingerprint = fingerprint(encoder)
        self.head = PooledHead(encoder.feature_channels, self.width)
        for part in encoder.tunable(tune):
            part.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training changes (the head and any tuned encoder part): all a saved surrogate needs."""
        names = {id(p) for p in self.trainable_parameters()}
        return {k: v for k, v in self.named_parameters() if id(v) in names}

    def forward(self, latents: torch.Tensor, prompts: list[str], cond=None) -> torch.Tensor:
        cond = cond if cond is not None else self.encode(prompts, latents)
        features = self.encoder(self.alpha_bar ** 0.5 * latents, self.timestep, cond)
        return self.head(features)

    def metadata(self) -> dict[str, str]:
        return {"comfy_rft.kind": SURROGATE_KIND, "comfy_rft.format_version": FORMAT_VERSION,
                "comfy_rft.base_model": self.base_model, "comfy_rft.encoder_fingerprint": self.base_fingerprint,
                "comfy_rft.surrogate": json.dumps({"timestep": self.timestep, "depth": self.encoder.depth_option,
                                                   "width": self.width, "tune": self.tune,
                                                   "feature_channels": self.encoder.feature_channels})}

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write the trainable state as safetensors with the metadata `load_surrogate` checks."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        save_file(tensors, str(path), metadata={**self.metadata(), **(extra or {})})
        return path

    def load_trainable_state(self, tensors: dict[str, torch.Tensor], source: str = "the state") -> None:
        own = self.trainable_state()
        if own.keys() != tensors.keys() or any(own[k].shape != tensors[k].shape for k in own):
            raise UserError(f"{source} does not fit this surrogate (other layers or shapes); it was made with other "
                            f"surrogate options or for another model")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(tensors[k])


def read_surrogate(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a surrogate file; UserError for a missing, unreadable or foreign file."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"surrogate file {path} not found; pass the *_surrogate.safetensors file a LaSRO run wrote")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for a file that is not one
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None
    if metadata.get("comfy_rft.kind") != SURROGATE_KIND:
        raise UserError(f"{path} is not a LaSRO surrogate file (no '{SURROGATE_KIND}' marker in its metadata; a "
                        f"LoRA file, for instance, is not one)")
    return tensors, metadata


def load_surrogate(path: str | Path, surrogate: Surrogate) -> Surrogate:
    """Load a saved surrogate into `surrogate` (a fresh one built for the current model, same options)."""
    tensors, metadata = read_surrogate(path)
    saved = json.loads(metadata.get("comfy_rft.surrogate", "{}"))
    ours = json.loads(surrogate.metadata()["comfy_rft.surrogate"])
    differing = {k: (saved.get(k), v) for k, v in ours.items() if k != "feature_channels" and saved.get(k) != v}
    if differing:
        details = ", ".join(f"{k}: file {a!r}, run {b!r}" for k, (a, b) in differing.items())
        raise UserError(f"{path} was made with other surrogate options ({details}); use the same options")
    if metadata.get("comfy_rft.encoder_fingerprint") != surrogate.base_fingerprint:
        base = metadata.get("comfy_rft.base_model") or "unknown"
        raise UserError(f"{path} is a surrogate for another model ({base}, encoder "
                        f"{metadata.get('comfy_rft.encoder_fingerprint')}); this model's encoder is "
                        f"{surrogate.base_fingerprint}. Train a surrogate for this model")
    surrogate.load_trainable_state(tensors, str(path))
    return surrogate


def bradley_terry_loss(scores: torch.Tensor, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """−mean log σ(s_w − s_l) over every pair of the same group (prompt) whose true rewards differ, w the
    better one. Zero (with a graph) when there is no such pair."""
    better = (rewards[:, None] > rewards[None, :]) & (groups[:, None] == groups[None, :])
    if not better.any():
        return scores.sum() * 0.0
    return F.softplus(-(scores[:, None] - scores[None, :])[better]).mean()


def pair_accuracy(scores: torch.Tensor, rewards: torch.Tensor, groups: torch.Tensor) -> float:
    """The fraction of same-group pairs with different true rewards that the scores order the same way
    (ties count half); nan when there is no such pair."""
    better = (rewards[:, None] > rewards[None, :]) & (groups[:, None] == groups[None, :])
    if not better.any():
        return float("nan")
    diff = (scores[:, None] - scores[None, :])[better]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()
