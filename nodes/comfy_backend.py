"""The engine's Backend over ComfyUI's MODEL / CLIP / VAE (DESIGN.md §3), so `comfy_rft.loop.train` runs on them.

- `denoiser` is the MODEL's own `diffusion_model` (LDM module names); the run's LoRA is injected there with
  peft for the run and removed afterwards (`remove_lora`), so the MODEL other nodes use is left as it was.
- `predict` goes through `BaseModel.apply_model` (conditioning from `extra_conds`, `model_sampling` object
  patches, APPLY_MODEL wrappers) and turns ComfyUI's denoised output back into the network's ε or v.
- `schedule` is the engine's DDIM schedule built from `model_sampling`'s σ table (discrete ε and v models).
- `decode` calls the VAE's `first_stage_model.decode` directly: differentiable, checkpointed, no CPU hop.
- Autograd inside ComfyUI's inference mode is handled in one place, `training_mode()`: gradients on, and
  the weights in the gradient path cloned once out of inference mode (`make_autograd_safe`).
- Models are loaded through `comfy.model_management.load_models_gpu` (no forced full load).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch.utils.checkpoint import checkpoint

from comfy_rft.backend import Cond
from comfy_rft.errors import UserError
from comfy_rft.rewards.surrogate import UNetEncoder, frozen_copy
from comfy_rft.schedule import schedule_from_alphas_cumprod

log = logging.getLogger("comfy_rft")

# family -> (modelspec architecture, native resolution)
FAMILIES = {
    "sd1": ("stable-diffusion-v1/lora", 512),
    "sd2": ("stable-diffusion-v2-768-v/lora", 768),
    "sdxl": ("stable-diffusion-xl-v1-base/lora", 1024),
}
SUPPORTED_CONDS = {"c_crossattn", "y"}


@contextlib.contextmanager
def training_mode():
    """Autograd on inside ComfyUI's `torch.inference_mode()`: tensors made here are ordinary tensors."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace the module's inference-mode parameters and buffers by ordinary clones (values unchanged).

    Loader nodes build weights under inference mode; autograd cannot save such tensors for backward
    ("Inference tensors cannot be saved for backward"). Cloning once per run is the cheapest fix. Call it
    inside `training_mode()`. Returns how many tensors were replaced.
    """
    replaced = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                replaced += 1
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()
                replaced += 1
    return replaced


def model_family(model) -> str:
    """sd1 / sd2 / sdxl for a ComfyUI MODEL (ModelPatcher); UserError for anything else."""
    import comfy.model_base

    base = model.model
    config = getattr(base, "model_config", None)
    unet_config = getattr(config, "unet_config", {}) or {}
    name = type(config).__name__ if config is not None else type(base).__name__
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    if type(base) is comfy.model_base.BaseModel and unet_config.get("adm_in_channels") is None:
        context = unet_config.get("context_dim")
        if context == 768:
            return "sd1"
        if context == 1024:
            return "sd2"
    raise UserError(f"comfy-rft trains SD1.x, SD2.x and SDXL UNet models; this MODEL is {name} "
                    f"({type(base).__name__}). Load an SD1.5, SD2.x or SDXL checkpoint.")


def _prediction_type(model_sampling) -> str:
    import comfy.model_sampling as ms

    if not isinstance(model_sampling, ms.ModelSamplingDiscrete) or isinstance(model_sampling,
                                                                              ms.ModelSamplingDiscreteEDM):
        raise UserError(f"the MODEL samples with {type(model_sampling).__name__}; comfy-rft's sampler needs a "
                        f"discrete DDPM schedule (SD1.x/SD2.x/SDXL, ε or v prediction). Remove ModelSampling* "
                        f"patch nodes before the trainer.")
    if isinstance(model_sampling, ms.EDM) or isinstance(model_sampling, ms.X0) or isinstance(model_sampling, ms.CONST):
        raise UserError(f"{type(model_sampling).__name__}: only ε and v prediction are supported "
                        f"(flow-matching models need a sampler the engine does not have yet)")
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, ms.EPS):
        return "epsilon"
    raise UserError(f"unknown parametrisation {type(model_sampling).__name__}")


def _cat_cond(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-prompt conditioning; cross-attention of different token lengths is repeated to their LCM
    (as ComfyUI's CONDCrossAttn does), so long prompts batch with short ones."""
    if len({t.shape[1:] for t in tensors}) == 1:
        return torch.cat(tensors)
    lcm = math.lcm(*(t.shape[1] for t in tensors))
    return torch.cat([t.repeat(1, lcm // t.shape[1], *([1] * (t.dim() - 2))) for t in tensors])


class ComfyBackend:
    """ComfyUI MODEL + CLIP + VAE as an engine Backend. Build and use it inside `training_mode()`."""

    def __init__(self, model, clip, vae, prompts: list[str], resolution: int = 0):
        import comfy.model_management as mm

        self.model, self.clip, self.vae = model, clip, vae
        self.base = model.model
        self.family = model_family(model)
        self.architecture, native = FAMILIES[self.family]
        self.model_sampling = model.get_model_object("model_sampling")
        prediction = _prediction_type(self.model_sampling)
        if self.family == "sd2" and prediction == "epsilon":
            native = 512  # SD2 base (512, ε); SD2 768 is v-prediction
        self.resolution = resolution or native
        self.sigma_data = float(getattr(self.model_sampling, "sigma_data", 1.0))
        if abs(self.sigma_data - 1.0) > 1e-6:
            raise UserError(f"model_sampling has sigma_data={self.sigma_data}; the DDPM sampler needs 1.0")
        sigmas = self.model_sampling.sigmas.detach().double().cpu()
        self._sigmas = sigmas
        self.schedule = schedule_from_alphas_cumprod(1.0 / (1.0 + sigmas**2), prediction)
        self.latent_channels = int(self.base.latent_format.latent_channels)
        self.vae_scale_factor = int(vae.spacial_compression_decode()) if hasattr(vae, "spacial_compression_decode") else 8
        self.device = torch.device(model.load_device)
        self.name = self.family
        self.cancel_requested = False  # Cancel was pressed while ComfyUI code ran inside a step (see _guarded)
        self.cancelled = False  # the trainer node has stopped the run after a Cancel; another Cancel aborts

        # Conditioning first (the CLIP is loaded and may be unloaded again), then UNet + VAE together, so
        # ComfyUI never evicts them mid-run to make room for the text encoder.
        self._cond_cache: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}
        for prompt in dict.fromkeys([*prompts, ""]):
            self._conditioning(prompt, self.resolution, self.resolution)
        shape = self.latent_shape(1)
        try:
            need = int(self.base.memory_required([4, *shape[1:]]) * 3)
            need += int(vae.memory_used_decode(shape, vae.vae_dtype) * 3)
        except Exception:  # a model without memory estimates: let ComfyUI decide
            need = 0
        mm.load_models_gpu([model, vae.patcher], memory_required=need)
        self.denoiser = self.base.diffusion_model
        self.vae_device = torch.device(vae.device)
        cloned = make_autograd_safe(self.denoiser) + make_autograd_safe(vae.first_stage_model)
        log.debug("comfy_rft: %d inference tensors cloned for autograd", cloned)
        self.denoiser.requires_grad_(False)
        vae.first_stage_model.requires_grad_(False)

    # ---- conditioning ------------------------------------------------------------------------
    @torch.no_grad()
    def _conditioning(self, prompt: str, height: int, width: int) -> dict[str, torch.Tensor]:
        key = (prompt, height, width)
        if key not in self._cond_cache:
            tokens = self.clip.tokenize(prompt)
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            cross = out.pop("cond")
            out = {k: v for k, v in out.items() if torch.is_tensor(v)}
            noise = torch.zeros((1, self.latent_channels, height // self.vae_scale_factor,
                                 width // self.vae_scale_factor))
            conds = self.base.extra_conds(cross_attn=cross, device=self.device, noise=noise, width=width,
                                          height=height, prompt_type="negative" if prompt == "" else "positive",
                                          **out)
            unsupported = set(conds) - SUPPORTED_CONDS
            if unsupported:
                raise UserError(f"this model needs conditioning inputs comfy-rft does not provide "
                                f"({', '.join(sorted(unsupported))}); use a text-to-image SD1.x/SD2.x/SDXL model")
            self._cond_cache[key] = {k: c.cond.detach().clone().float().to(self.device) for k, c in conds.items()}
        return self._cond_cache[key]

    def encode(self, prompts: list[str], height: int | None = None, width: int | None = None) -> Cond:
        h, w = height or self.resolution, width or self.resolution
        rows = [self._conditioning(p, h, w) for p in prompts]
        uncond = self._conditioning("", h, w)
        n = len(prompts)
        embeds = _cat_cond([r["c_crossattn"] for r in rows])
        un = uncond["c_crossattn"]
        if un.shape[1] != embeds.shape[1]:
            lcm = math.lcm(un.shape[1], embeds.shape[1])
            embeds = embeds.repeat(1, lcm // embeds.shape[1], 1)
            un = un.repeat(1, lcm // un.shape[1], 1)
        cond = Cond(embeds=embeds, uncond=un.expand(n, *un.shape[1:]))
        if "y" in uncond:
            cond.pooled = torch.cat([r["y"] for r in rows])
            cond.uncond_pooled = uncond["y"].expand(n, *uncond["y"].shape[1:])
        return cond

    # ---- model -------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, t: int, cond: Cond, guidance: float = 1.0) -> torch.Tensor:
        """The network's ε or v at the DDPM latent x_t (CFG when guidance != 1), like the diffusers backend."""
        import comfy.model_management as mm

        if self.cancelled:  # after a first Cancel the run is finishing; a second one aborts at once
            mm.throw_exception_if_processing_interrupted()
        sigma = float(self._sigmas[t])
        scale = math.sqrt(sigma**2 + self.sigma_data**2)
        if guidance == 1.0:
            inputs, embeds, pooled, order = x, cond.embeds, cond.pooled, [0]
        else:
            inputs = torch.cat([x, x])
            embeds = torch.cat([cond.uncond, cond.embeds])
            pooled = None if cond.pooled is None else torch.cat([cond.uncond_pooled, cond.pooled])
            order = [1, 0]  # ComfyUI: 0 = cond, 1 = uncond
        x_in = inputs * scale  # ComfyUI's x = x0 + σ·ε scale; its calculate_input divides it back
        sigmas = torch.full((inputs.shape[0],), sigma, device=x.device, dtype=torch.float32)
        options = dict(self.model.model_options.get("transformer_options", {}))
        options.update(sigmas=sigmas, cond_or_uncond=order)  # one entry per batch chunk, as calc_cond_batch
        kwargs = {"c_crossattn": embeds}
        if pooled is not None:
            kwargs["y"] = pooled
        denoised = self._guarded(self.base.apply_model, x_in, sigmas, transformer_options=options, **kwargs).float()
        out = self._model_output(denoised, x_in, sigma).to(x.dtype)
        if guidance == 1.0:
            return out
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    def _guarded(self, fn, *args, **kwargs):
        """Run ComfyUI code that may check the Cancel flag (its attention does) without losing the step.

        The first Cancel is remembered (`cancel_requested`) and the call repeated, so the step completes and
        the node stops after it with a checkpoint; a Cancel after that, or once the run is stopping, aborts.
        """
        import comfy.model_management as mm

        while True:
            try:
                return fn(*args, **kwargs)
            except mm.InterruptProcessingException:
                if self.cancelled or self.cancel_requested:
                    raise
                self.cancel_requested = True

    def _model_output(self, denoised, x_in, sigma):
        """Invert ComfyUI's `calculate_denoised` (EPS: x − σ·out; V: x·sd²/(σ²+sd²) − out·σ·sd/√(σ²+sd²))."""
        sd2 = self.sigma_data**2
        if self.schedule.prediction_type == "epsilon":
            return (x_in - denoised) / sigma
        return (x_in * sd2 / (sigma**2 + sd2) - denoised) * math.sqrt(sigma**2 + sd2) / (sigma * self.sigma_data)

    def decode(self, latents: torch.Tensor, use_checkpoint: bool = True) -> torch.Tensor:
        """Model latents -> images [B,3,H,W] in [0,1], differentiable; recomputed in backward when checkpointed."""
        vae = self.vae

        def _decode(z):
            z = self.base.process_latent_out(z)
            z = z.to(self.vae_device, vae.vae_dtype)
            return self._guarded(vae.first_stage_model.decode, z).float().to(self.device)

        if use_checkpoint and torch.is_grad_enabled() and latents.requires_grad:
            images = checkpoint(_decode, latents, use_reentrant=False)
        else:
            images = _decode(latents)
        return ((images + 1.0) / 2.0).clamp(0, 1)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.resolution, width or self.resolution
        f = self.vae_scale_factor
        if h % f or w % f:
            raise UserError(f"image size {h}x{w} must be a multiple of {f} for this model")
        return (batch, self.latent_channels, h // f, w // f)

    def unet_encoder(self, depth: int = -1) -> torch.nn.Module:
        """A frozen copy of the UNet's encoder half (LaSRO's surrogate backbone), without the run's LoRA. It is not
        one of ComfyUI's managed models: its memory (about half the UNet's) is not in ComfyUI's accounting."""
        return LdmUNetEncoder(self.denoiser, depth)

    # ---- the run's LoRA ----------------------------------------------------------------------
    def lora_layer_paths(self, adapter_name: str = "default") -> list[str]:
        from comfy_rft.lora import _lora_layers

        return [path for path, _ in _lora_layers(self.denoiser, adapter_name)]

    def remove_lora(self) -> int:
        """Put every peft-wrapped layer back to its base layer and drop peft's bookkeeping: the MODEL is as before."""
        from comfy_rft.lora import remove_adapters

        return remove_adapters(self.denoiser)

    def layers_per_block(self) -> int:
        blocks = getattr(self.denoiser, "num_res_blocks", None)
        values = set(blocks) if isinstance(blocks, (list, tuple)) else {blocks}
        if len(values) != 1 or None in values:
            raise UserError(f"the UNet has a different number of resnets per block ({blocks}); its LoRA cannot be "
                            f"given diffusers names")
        return int(values.pop())


class LdmUNetEncoder(UNetEncoder):
    """The encoder of ComfyUI's `UNetModel` (LDM names), grouped into the levels diffusers has: each down level is
    its input blocks up to and including its downsampler, then the middle block. It reads what the UNet computes
    there (tests/test_comfyui_integration.py checks it against the model's own forward)."""

    def __init__(self, unet: torch.nn.Module, depth: int = -1):
        if getattr(unet, "middle_block", None) is None or not hasattr(unet, "input_blocks"):
            raise UserError(f"LaSRO's surrogate reads SD1.x/SD2/SDXL UNet encoders; this model's "
                            f"{type(unet).__name__} has no input_blocks/middle_block")
        blocks, counts, mult = list(unet.input_blocks), list(unet.num_res_blocks), list(unet.channel_mult)
        levels, start = [], 1
        for level, count in enumerate(counts):
            end = start + count + (level < len(counts) - 1)  # the res blocks, then the downsampler but on the last
            levels.append(torch.nn.ModuleList(blocks[start:end]))
            start = end
        levels.append(torch.nn.ModuleList([unet.middle_block]))
        channels = [unet.model_channels * m for m in mult] + [unet.model_channels * mult[-1]]
        super().__init__(blocks[0][0], levels, channels, depth)
        self.model_channels = unet.model_channels
        self.time_embed = frozen_copy(unet.time_embed)
        self.label_emb = frozen_copy(unet.label_emb) if getattr(unet, "num_classes", None) is not None else None

    def embedding(self, x, t, cond):
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        timesteps = torch.full((x.shape[0],), float(t), device=x.device)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(self.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(cond.pooled.to(self.dtype))
        return emb

    def run_level(self, level, h, emb, context):
        for block in level:  # a TimestepEmbedSequential: resnets take emb, transformers the context
            h = block(h, emb, context, {})
        return h
