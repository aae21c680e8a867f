"""Tiny SD1.5- and SDXL-shaped diffusers pipelines, built in code and saved as real diffusers folders.

They carry the real module names (so LoRA keys match real files) and a byte-level CLIP tokenizer
built in memory, so tests and the demo need no download. `tiny_model_dir` builds a pipeline once,
deterministically from a seed, and caches the folder; the real backend loader then reads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_MODELS = ("tiny-sd15", "tiny-sdxl")
# Bump when the architecture or the init changes: cached folders are keyed by it.
TINY_VERSION = "1"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that GPT-2/CLIP byte-level BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def byte_level_clip_tokenizer():
    """A 514-token CLIP tokenizer (bytes, bytes+</w>, two specials) with no merges."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=512, eos_token_id=513, pad_token_id=513, max_position_embeddings=77, projection_dim=32,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        latent_channels=4, block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def build_tiny_pipeline(name: str = "tiny-sd15", seed: int = 0, prediction_type: str = "epsilon"):
    """Build a random-weight pipeline with SD1.5 ("tiny-sd15") or SDXL ("tiny-sdxl") module names."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    torch.manual_seed(seed)
    if name == "tiny-sd15":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=8,
        )
        return StableDiffusionPipeline(
            unet=unet, vae=_vae(), text_encoder=_text_encoder(), tokenizer=byte_level_clip_tokenizer(),
            scheduler=_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=_vae(), text_encoder=_text_encoder(), text_encoder_2=_text_encoder(with_projection=True),
        tokenizer=byte_level_clip_tokenizer(), tokenizer_2=byte_level_clip_tokenizer(),
        scheduler=_scheduler(prediction_type), force_zeros_for_empty_prompt=True,
    )


def cache_dir() -> Path:
    """Where built tiny models live: $COMFY_RFT_CACHE, else ~/.cache/comfy_rft."""
    return Path(os.environ.get("COMFY_RFT_CACHE", Path.home() / ".cache" / "comfy_rft"))


def tiny_model_dir(name: str) -> Path:
    """The diffusers folder of an embedded tiny model, built on first use (atomically) and cached."""
    target = cache_dir() / "tiny" / f"{name}-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        build_tiny_pipeline(name).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
