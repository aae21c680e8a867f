"""The diffusers backend: what every method needs from an SD1.x / SD2 / SDXL model.

`Backend` is the seam between methods and models (DESIGN.md §3): `encode` prompts once (cached),
`predict` through the trainable denoiser with CFG, the `schedule` math, and a differentiable,
checkpointable `decode`. The ComfyUI adapter in `nodes/` implements the same surface.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .quiet import quiet_libraries
from .schedule import DDIMSchedule
from .tiny import TINY_MODELS, tiny_model_dir
from .toyworld import TOY_MODEL
from .toyworld import model_dir as toy_model_dir

EMBEDDED_MODELS = (TOY_MODEL, *TINY_MODELS)


def embedded_model_path(spec: str) -> Path | None:
    """The folder of an embedded model named by `spec` (built on first use for the tiny ones), else None."""
    if spec == TOY_MODEL:
        return toy_model_dir()
    return tiny_model_dir(spec) if spec in TINY_MODELS else None


@dataclass
class Cond:
    """Prompt conditioning for a batch, with the unconditional branch for CFG."""

    embeds: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL only
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # SDXL only

    def repeat_interleave(self, n: int) -> "Cond":
        """Each row repeated n times (several samples per prompt)."""
        rep = lambda x: None if x is None else x.repeat_interleave(n, dim=0)  # noqa: E731
        return Cond(*(rep(getattr(self, f)) for f in ("embeds", "uncond", "pooled", "uncond_pooled", "time_ids")))


class DiffusersBackend:
    """A diffusers SD1.x/SD2/SDXL pipeline with frozen weights; the LoRA goes on `denoiser`."""

    def __init__(self, pipe, name: str = "model", device: str | torch.device | None = None):
        self.pipe = pipe
        self.name = name
        self.device = torch.device(device) if device is not None else pipe.unet.device
        pipe.to(self.device)
        self.denoiser = pipe.unet
        self.dtype = pipe.unet.dtype  # diffusers walks every module to answer unet.dtype: ask once
        self.vae = pipe.vae
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.schedule = DDIMSchedule(pipe.scheduler.config)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = self.denoiser.config.sample_size * self.vae_scale_factor
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._uncond: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, device: str | None = None, dtype: torch.dtype = torch.float32,
             model_config: str | None = None) -> "DiffusersBackend":
        """Load from a tiny model name, a local diffusers folder or a single-file checkpoint. Never downloads."""
        path = embedded_model_path(spec) or Path(spec).expanduser()
        if not path.exists():
            raise UserError(
                f"model {spec!r} not found. Pass a local diffusers folder (with model_index.json), a single-file "
                f"checkpoint (.safetensors/.ckpt), or one of the embedded models: {', '.join(EMBEDDED_MODELS)}."
            )
        with quiet_libraries():
            pipe = _load_folder(path, dtype) if path.is_dir() else _load_single_file(path, dtype, model_config)
        return cls(pipe, name=spec, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ---- conditioning ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], height: int | None = None, width: int | None = None) -> Cond:
        """Frozen text conditioning for `prompts`; each prompt is encoded once and cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            embeds, pooled, uncond, uncond_pooled = self._encode_uncached(missing)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = (embeds[i], None if pooled is None else pooled[i])
            if self._uncond is None:
                self._uncond = (uncond[0], None if uncond_pooled is None else uncond_pooled[0])
        rows = [self._prompt_cache[p] for p in prompts]
        n = len(prompts)
        cond = Cond(
            embeds=torch.stack([r[0] for r in rows]),
            uncond=self._uncond[0].expand(n, *self._uncond[0].shape),
        )
        if self.is_sdxl:
            h, w = height or self.resolution, width or self.resolution
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=cond.embeds.dtype, device=self.device)
            cond = replace(
                cond, pooled=torch.stack([r[1] for r in rows]),
                uncond_pooled=self._uncond[1].expand(n, *self._uncond[1].shape), time_ids=time_ids.expand(n, 6),
            )
        return cond

    def _encode_uncached(self, prompts: list[str]):
        if self.is_sdxl:
            embeds, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
            return embeds, pooled, uncond, uncond_pooled
        embeds, uncond = self.pipe.encode_prompt(prompts, self.device, 1, True)
        return embeds, None, uncond, None

    # ---- model -------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, t: int, cond: Cond, guidance: float = 1.0) -> torch.Tensor:
        """The denoiser's output (ε or v) at x_t, with classifier-free guidance when guidance != 1."""
        return unet_prediction(self.denoiser, self.dtype, x, t, cond, guidance)

    def unet_encoder(self, depth: int = -1) -> torch.nn.Module:
        """A frozen copy of the denoiser's encoder half (conv_in, down blocks, mid block; `depth` levels after
        conv_in, -1 all), without any adapter: the backbone of LaSRO's surrogate reward."""
        from .rewards.surrogate import DiffusersUNetEncoder

        return DiffusersUNetEncoder(self.denoiser, depth)

    def decode(self, latents: torch.Tensor, use_checkpoint: bool = True) -> torch.Tensor:
        """Latents -> images [B,3,H,W] in [0,1], differentiable; recomputed in backward when checkpointed."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0

        def _decode(z):
            return vae.decode((z / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()

        if use_checkpoint and torch.is_grad_enabled() and latents.requires_grad:
            images = checkpoint(_decode, latents, use_reentrant=False)
        else:
            images = _decode(latents)
        return (images / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.resolution, width or self.resolution
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise UserError(f"image size {h}x{w} must be a multiple of {self.vae_scale_factor} for this model")
        return (batch, self.denoiser.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)


def unet_prediction(unet, dtype: torch.dtype, x: torch.Tensor, t: int, cond: Cond, guidance: float = 1.0,
                    **unet_kwargs) -> torch.Tensor:
    """A diffusers UNet's output at x_t (CFG when guidance != 1); `unet_kwargs` go to the UNet (e.g. an LCM
    UNet's `timestep_cond`, per sample, repeated for the CFG batch)."""
    if guidance == 1.0:
        inputs, embeds, pooled, time_ids = x, cond.embeds, cond.pooled, cond.time_ids
    else:
        inputs = torch.cat([x, x])
        embeds = torch.cat([cond.uncond, cond.embeds])
        pooled = None if cond.pooled is None else torch.cat([cond.uncond_pooled, cond.pooled])
        time_ids = None if cond.time_ids is None else torch.cat([cond.time_ids, cond.time_ids])
        unet_kwargs = {k: torch.cat([v, v]) for k, v in unet_kwargs.items()}
    added = None if pooled is None else {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
    timestep = torch.full((inputs.shape[0],), t, device=x.device, dtype=torch.long)
    out = unet(inputs.to(dtype), timestep, encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added,
               **{k: v.to(dtype) for k, v in unet_kwargs.items()}).sample
    out = out.to(x.dtype)
    if guidance == 1.0:
        return out
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


_SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _load_folder(path: Path, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    index = path / "model_index.json"
    if not index.exists():
        raise UserError(
            f"{path} is not a diffusers model folder (no model_index.json). Pass the folder that contains "
            f"model_index.json, or a single-file checkpoint (.safetensors/.ckpt)."
        )
    try:
        # A safety checker is inference-only baggage here: skip loading it when the folder has one.
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in json.loads(
            index.read_text()) else {}
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise UserError(f"could not load the diffusers folder {path}: {err}") from err
    _check_supported(pipe, path)
    return pipe


def _check_supported(pipe, path):
    if type(pipe).__name__ not in _SUPPORTED or getattr(pipe, "unet", None) is None:
        raise UserError(
            f"{path} holds a {type(pipe).__name__}; comfy-rft trains SD1.x/SD2 (StableDiffusionPipeline) and "
            f"SDXL (StableDiffusionXLPipeline) UNet models."
        )


def _is_sdxl_checkpoint(path: Path) -> bool:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return any(k.startswith("conditioner.embedders.1") for k in f.keys())
    return "xl" in path.name.lower()


def _load_single_file(path: Path, dtype: torch.dtype, model_config: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        pipeline_cls = StableDiffusionXLPipeline if _is_sdxl_checkpoint(path) else StableDiffusionPipeline
    except Exception as err:  # safetensors' own error types vary by version
        raise UserError(f"{path} is not a readable model checkpoint ({err}). Pass a .safetensors/.ckpt "
                        f"checkpoint or a diffusers folder.") from err
    kwargs = {"config": model_config} if model_config else {}
    try:
        pipe = pipeline_cls.from_single_file(str(path), dtype=dtype, local_files_only=True, **kwargs)
    except Exception as err:  # diffusers raises many types here; all mean "cannot do it offline"
        raise UserError(
            f"could not load the single-file checkpoint {path} offline ({type(err).__name__}: {err}). "
            f"diffusers needs the model's config for that: pass --model-config DIR with a local diffusers folder "
            f"of the same architecture, or convert the checkpoint to a diffusers folder and pass that folder."
        ) from err
    _check_supported(pipe, path)
    return pipe
