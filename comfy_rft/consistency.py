"""Consistency models as one-step x̂0 predictors (SQDF's f_ψ): an LCM-LoRA file or an LCM UNet folder, both local.

- An **LCM-LoRA** (e.g. latent-consistency/lcm-lora-sdv1-5's kohya-layout file) is loaded as a second,
  frozen adapter on the backend's own denoiser and switched on only for its own calls (the run's LoRA is
  off then, and the LCM-LoRA is off for every other call). No copy of the UNet: the memory-sane choice; the
  price is running the LoRA unmerged (its extra matmuls) in those calls.
- An **LCM UNet folder** (a diffusers `UNet2DConditionModel` folder, or a pipeline folder with `unet/`) is a
  different network, so it is a second, frozen UNet beside the denoiser (diffusers models only).

Either is called as the research code does: without CFG (guidance 1, the conditional branch; LCMs with a
guidance embedding get w = 0), at the timestep of LCM's grid nearest to the latent's, and its output goes
through LCM's boundary condition (`DDIMSchedule.consistency_x0`). Whether a file really is a consistency
distillation cannot be read from its weights: it is checked to fit this model, nothing more.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backend import Cond, unet_prediction
from .errors import UserError
from .lora import load_lora, only_adapters
from .sampler import checkpointed, predict

ADAPTER = "rft_consistency"  # the LCM-LoRA's adapter name on the denoiser


class ConsistencyModel:
    """x̂0 = f_ψ(x_t) through the consistency model's boundary condition."""

    def __init__(self, backend):
        self.backend = backend

    def output(self, x: torch.Tensor, t: int, cond: Cond, use_checkpoint: bool) -> torch.Tensor:
        raise NotImplementedError

    def x0(self, x: torch.Tensor, t: int, cond: Cond, use_checkpoint: bool = True) -> torch.Tensor:
        """x̂0 of the latent x at timestep t, differentiable in x (the model's own weights are frozen)."""
        schedule = self.backend.schedule
        t_cm = schedule.consistency_timestep(t)
        return schedule.consistency_x0(self.output(x, t_cm, cond, use_checkpoint), x, t_cm)


class LoraConsistencyModel(ConsistencyModel):
    def __init__(self, backend, path: Path):
        super().__init__(backend)
        with only_adapters(backend.denoiser, ()):  # loaded switched off; every other adapter keeps its state
            load_lora(backend.denoiser, path, adapter_name=ADAPTER)

    def output(self, x, t, cond, use_checkpoint):
        return predict(self.backend, x, t, cond, 1.0, use_checkpoint, adapters=(ADAPTER,))


class UNetConsistencyModel(ConsistencyModel):
    def __init__(self, backend, folder: Path):
        from diffusers import UNet2DConditionModel

        from .quiet import quiet_libraries

        super().__init__(backend)
        if not hasattr(backend, "pipe"):
            raise UserError("an LCM UNet folder needs a diffusers model; with a ComfyUI MODEL use an LCM-LoRA file, "
                            "or leave the consistency model empty for Tweedie's x̂0")
        if (folder / "model_index.json").is_file():  # a whole pipeline folder: its UNet
            folder = folder / "unet"
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} is not a diffusers UNet folder (no config.json); pass an LCM UNet folder "
                            f"(config.json + weights), a pipeline folder with unet/, or an LCM-LoRA .safetensors file")
        try:
            with quiet_libraries():
                unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=backend.dtype, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"could not load the LCM UNet folder {folder}: {err}") from err
        ours, theirs = backend.denoiser.config, unet.config
        for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type"):
            if getattr(ours, key, None) != getattr(theirs, key, None):
                raise UserError(f"the LCM UNet in {folder} does not fit this model ({key}: {getattr(theirs, key, None)}"
                                f", the model's: {getattr(ours, key, None)}); use the LCM made for this base model")
        self.unet = unet.to(backend.device).requires_grad_(False).eval()

    def output(self, x, t, cond, use_checkpoint):
        from diffusers.models.embeddings import get_timestep_embedding

        extra = {}
        if self.unet.config.time_cond_proj_dim is not None:  # LCM's guidance embedding of w = 0 (guidance 1)
            extra["timestep_cond"] = get_timestep_embedding(x.new_zeros(x.shape[0]), self.unet.config.time_cond_proj_dim,
                                                            flip_sin_to_cos=False, downscale_freq_shift=1)

        def forward(x_in):
            return unet_prediction(self.unet, self.unet.dtype, x_in, t, cond, 1.0, **extra)

        return checkpointed(forward, x, use_checkpoint)


def load_consistency_model(backend, source: str) -> ConsistencyModel:
    """An LCM-LoRA .safetensors file or an LCM UNet folder for the backend's model (UserError if it does not fit)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"consistency model {source!r} not found: pass a local LCM-LoRA .safetensors file (e.g. "
                        f"pytorch_lora_weights.safetensors of latent-consistency/lcm-lora-sdv1-5, downloaded "
                        f"beforehand) or an LCM UNet folder, or leave it empty for Tweedie's x̂0")
    return UNetConsistencyModel(backend, path) if path.is_dir() else LoraConsistencyModel(backend, path)
