"""Tiny SD1.5- and SDXL-shaped diffusers pipelines, built in code and saved as real diffusers folders.

They carry the real module names (so LoRA keys match real files) and a byte-level CLIP tokenizer
built in memory, so tests and the demo need no download. `tiny_model_dir` builds a pipeline once,
deterministically from a seed, and caches the folder; the real backend loader then reads it.

Purely random weights make a degenerate model: its samples are ~14x the noise scale and its random
decoder barely responds to its latents, so no reward can move. `fit_tiny_pipeline` spends a few
seconds making it a trivial but sane one: the decoder maps latents to colours through a fixed
latent->RGB matrix (like SD's preview map) and the UNet denoises a unit-Gaussian latent "dataset".
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .quiet import quiet_libraries

TINY_MODELS = ("tiny-sd15", "tiny-sdxl")
# Bump when the architecture or the init changes: cached folders are keyed by it.
TINY_VERSION = "2"


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


def build_tiny_pipeline(name: str = "tiny-sd15", seed: int = 0, prediction_type: str = "epsilon", fit: bool = True):
    """A pipeline with SD1.5 ("tiny-sd15") or SDXL ("tiny-sdxl") module names; random weights unless `fit`."""
    pipe = _build_random(name, seed, prediction_type)
    if fit:
        fit_tiny_pipeline(pipe, seed)
    return pipe


def _build_random(name: str, seed: int, prediction_type: str):
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


# Latent channel -> RGB, close to the linear map people use to preview SD latents.
_LATENT_TO_RGB = ((0.35, 0.23, 0.32, -0.17), (0.33, 0.50, 0.24, -0.18), (0.30, 0.30, 0.26, -0.35))


def fit_tiny_pipeline(pipe, seed: int = 0, steps: int = 100, batch: int = 8) -> None:
    """Fit the decoder to a fixed latent->RGB map and the UNet to denoise N(0, I) latents (seconds on a CPU).

    Float sums depend on torch's thread count, so the fit runs on one thread: every build of a name and
    seed gives the same weights whatever threads the caller runs (a cached model must not depend on
    which command happened to build it first).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit(pipe, seed, steps, batch)
    finally:
        torch.set_num_threads(threads)


def _fit(pipe, seed: int, steps: int, batch: int) -> None:
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    vae, unet = pipe.vae, pipe.unet
    rgb = torch.tensor(_LATENT_TO_RGB)
    latent_hw = unet.config.sample_size
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.Adam(decoder_params, lr=2e-3)
    for _ in range(steps):
        z = torch.randn(batch, 4, latent_hw, latent_hw, generator=gen)
        target = F.interpolate(torch.einsum("cl,blhw->bchw", rgb, z), scale_factor=scale, mode="bilinear")
        loss = F.mse_loss(vae.decode(z / vae.config.scaling_factor).sample, target.clamp(-1, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    alphas = pipe.scheduler.alphas_cumprod
    sdxl = unet.config.addition_embed_type == "text_time"
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    for _ in range(steps):
        x0, eps = torch.randn((2, batch, 4, latent_hw, latent_hw), generator=gen)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        target = eps if pipe.scheduler.config.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
        added = {"text_embeds": torch.randn(batch, 32, generator=gen),
                 "time_ids": torch.tensor([64.0, 64, 0, 0, 64, 64]).expand(batch, 6)} if sdxl else None
        out = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=context, added_cond_kwargs=added)
        loss = F.mse_loss(out.sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe.unet.eval()
    pipe.vae.eval()


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
        with quiet_libraries():
            build_tiny_pipeline(name).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
