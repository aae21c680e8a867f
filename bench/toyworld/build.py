"""Build the toy world from nothing: a text-to-image latent diffusion model of coloured shapes, a proxy
reward and a gold classifier ensemble, all trained here, deterministically, on one CPU thread.

    python bench/toyworld/build.py [--out comfy_rft/toyworld] [--scale 1.0]

Writes `model/` (a diffusers StableDiffusionPipeline folder: UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, a CLIP BPE tokenizer learnt on the world's 12 words, DDIMScheduler; fp16 weights),
`proxy.safetensors`, `gold.safetensors` and `build_report.json` (timings, the VAE's error, the
classifiers' accuracies and the base model's caption accuracy). `--scale 0.1` is a smoke test;
`--only classifiers` retrains the two classifiers (a few minutes) on the existing model. The
committed files were made by this script with the defaults; the model takes about 25 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from comfy_rft.tiny import _bytes_to_unicode
from comfy_rft.toyworld import shapes
from comfy_rft.toyworld.classifier import AttributeClassifier, Ensemble, caption_hits, save_ensemble

WORDS = ("a", "on", "background", *shapes.COLOUR_NAMES, *shapes.SHAPES)
MAX_TOKENS = 12  # <bos> + 8 words + <eos> fits
SEED = 20261121
SAMPLING_STEPS, GUIDANCE = 10, 3.0  # how the toy model is sampled here, in the demo and in bench/evidence.py


# ---- tokenizer and model ----------------------------------------------------------------------
def learn_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges that make each word one token (plain BPE training on the word list)."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while any(len(p) > 1 for p in pieces.values()):
        pairs = Counter((p[i], p[i + 1]) for p in pieces.values() for i in range(len(p) - 1))
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for w, p in pieces.items():
            merged, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == best:
                    merged.append(p[i] + p[i + 1])
                    i += 2
                else:
                    merged.append(p[i])
                    i += 1
            pieces[w] = merged
    return merges


def build_tokenizer():
    """CLIP's byte-level BPE with merges for the world's words: any text tokenizes, each word is one token."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = learn_merges(WORDS)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    return tokenizer


def build_modules(vocab_size: int, bos: int, eos: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, max_position_embeddings=MAX_TOKENS, projection_dim=64))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=shapes.SIZE)
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return text_encoder, vae, unet, scheduler


# ---- training -----------------------------------------------------------------------------------
def cosine_lr(optimizer, step: int, total: int, peak: float, warmup: int = 100) -> None:
    lr = peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def batch(n: int, gen: torch.Generator):
    """n random (attributes, images, sizes)."""
    attributes = shapes.random_attributes(n, gen)
    return attributes, *shapes.render_sized(attributes, gen)


def train_vae(vae, steps: int, gen: torch.Generator, log) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        cosine_lr(optimizer, step, steps, 1e-3)
        _, images, _ = batch(32, gen)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} mse {F.mse_loss(recon, x).item():.4f}")
    vae.eval()
    with torch.no_grad():
        _, images, _ = batch(256, gen)
        recon = vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample
        return F.mse_loss(recon, images * 2 - 1).item()


@torch.no_grad()
def latent_dataset(vae, tokenizer, text_size: int, n: int, gen: torch.Generator):
    """n (latent mean, caption ids) pairs and the latents' scaling factor (1 / std, as SD's 0.18215)."""
    latents, ids = [], []
    for start in range(0, n, 256):
        attributes, images, _ = batch(min(256, n - start), gen)
        latents.append(vae.encode(images * 2 - 1).latent_dist.mean)
        captions = [shapes.caption(shapes.COLOUR_NAMES[c], shapes.SHAPES[s], shapes.COLOUR_NAMES[b])
                    for s, c, b in attributes.tolist()]
        ids.append(tokenizer(captions, padding="max_length", max_length=text_size, return_tensors="pt").input_ids)
    latents = torch.cat(latents)
    return latents, torch.cat(ids), 1.0 / latents.std().item()


def train_unet(unet, text_encoder, scheduler, latents, ids, empty_ids, steps: int, gen: torch.Generator, log):
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    alphas = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    running = None
    for step in range(steps):
        cosine_lr(optimizer, step, steps, 1e-3)
        rows = torch.randint(0, len(latents), (64,), generator=gen)
        x0 = latents[rows]
        flip = torch.rand(64, generator=gen) < 0.5  # shapes are left-right symmetric up to position
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        tokens = ids[rows].clone()
        tokens[torch.rand(64, generator=gen) < 0.1] = empty_ids  # caption dropout for classifier-free guidance
        t = torch.randint(0, len(alphas), (64,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        context = text_encoder(tokens).last_hidden_state
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            log(f"unet {step}/{steps} loss {running:.4f}")
    unet.eval()
    text_encoder.eval()


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur, brightness/contrast and shifts: the gold ensemble must not hinge on pixel details."""
    n = len(images)
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = torch.where((rand(n) < 0.5).view(-1, 1, 1, 1), blurred, images)
    images = (images - 0.5) * (0.8 + 0.4 * rand(n, 1, 1, 1)) + 0.5 + (rand(n, 1, 1, 1) - 0.5) * 0.2
    images = images + torch.randn(images.shape, generator=gen) * 0.08 * rand(n, 1, 1, 1)
    shift = torch.randint(-3, 4, (2,), generator=gen).tolist()
    return images.roll(shifts=shift, dims=(2, 3)).clamp(0, 1)


def train_classifier(width: int, data: tuple | None, steps: int, gen: torch.Generator, augmented: bool,
                     weight_decay: float) -> AttributeClassifier:
    """A classifier and size regressor on a fixed small set (`data`, the proxy) or on fresh augmented
    renders (gold)."""
    model = AttributeClassifier(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=weight_decay)
    for step in range(steps):
        cosine_lr(optimizer, step, steps, 3e-3, warmup=20)
        if data is None:
            attributes, images, sizes = batch(64, gen)
        else:
            rows = torch.randint(0, len(data[0]), (64,), generator=gen)
            attributes, images, sizes = (d[rows] for d in data)
        if augmented:
            images = augment(images, gen)
        *logits, size = model(images)
        loss = sum(F.cross_entropy(x, attributes[:, i]) for i, x in enumerate(logits))
        loss = loss + 4 * F.mse_loss(size.squeeze(1), sizes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False).eval()


@torch.no_grad()
def accuracy(ensemble: Ensemble, images: torch.Tensor, attributes: torch.Tensor, sizes: torch.Tensor) -> dict:
    """How often the ensemble gets all three attributes right, and its size error (RMSE, sizes 0..1)."""
    return {"attributes": caption_hits(ensemble, images, attributes).float().mean().item(),
            "size_rmse": (ensemble.predict(images)[1] - sizes).square().mean().sqrt().item()}


# ---- the base model's caption accuracy -----------------------------------------------------------
@torch.no_grad()
def caption_accuracy(model_dir: Path, gold: Ensemble, per_caption: int, steps: int, guidance: float) -> dict:
    """Sample every caption `per_caption` times through the library's own loader and sampler."""
    from comfy_rft.backend import DiffusersBackend
    from comfy_rft.sampler import SamplerNoise, sample

    backend = DiffusersBackend.load(str(model_dir), device="cpu")
    captions = shapes.all_captions() * per_caption
    hits, checks = [], []
    for start in range(0, len(captions), 72):
        prompts = captions[start:start + 72]
        noise = SamplerNoise.from_seed(SEED, backend.latent_shape(len(prompts)), steps, first_index=start)
        latents = sample(backend, backend.encode(prompts), noise, num_steps=steps, eta=0.0, guidance=guidance).latents
        images = backend.decode(latents)
        labels = shapes.labels(prompts)
        hits.append(caption_hits(gold, images, labels).float())
        checks.append(shapes.check(images, labels)[0])
    hits, checks = torch.cat(hits), torch.cat(checks)
    chance = 1 / (len(shapes.SHAPES) * len(shapes.COLOURS) * (len(shapes.COLOURS) - 1))
    return {"samples": len(captions), "sampling_steps": steps, "guidance": guidance,
            "gold_caption_accuracy": hits.mean().item(), "programmatic_all_three": (checks == 1).float().mean().item(),
            "programmatic_attribute_accuracy": checks.mean().item(), "chance": chance}


def build_model(tmp: Path, steps, log) -> dict:
    """Train the VAE, then the UNet and text encoder on its latents; save the pipeline folder (fp16)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    report: dict = {"seconds": {}}
    tokenizer = build_tokenizer()
    text_encoder, vae, unet, scheduler = build_modules(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    report["parameters"] = {name: sum(p.numel() for p in m.parameters())
                            for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    log(f"parameters {report['parameters']}")
    t0 = time.perf_counter()
    report["vae_reconstruction_mse"] = train_vae(vae, steps(1200), gen, log)
    report["seconds"]["vae"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    latents, ids, scaling = latent_dataset(vae, tokenizer, MAX_TOKENS, steps(20000), gen)
    vae.register_to_config(scaling_factor=scaling)
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    train_unet(unet, text_encoder, scheduler, latents * scaling, ids, empty_ids, steps(3500), gen, log)
    report["seconds"]["unet"] = round(time.perf_counter() - t0, 1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(tmp / "model")
    return report


def build_classifiers(tmp: Path, steps) -> tuple[Ensemble, dict]:
    """The proxy (240 clean renders, memorised) and the gold ensemble (fresh augmented renders, 5 members)."""
    torch.manual_seed(SEED + 1)  # the weights' init: the same whether or not the model was trained first
    gen = torch.Generator().manual_seed(SEED + 1)
    t0 = time.perf_counter()
    proxy_data = batch(240, gen)  # ~7 images per caption, clean, memorised: sharp and hackable
    proxy = Ensemble([train_classifier(12, proxy_data, steps(600), gen, augmented=False, weight_decay=0.0)])
    gold = Ensemble([train_classifier(w, None, steps(1200), gen, augmented=True, weight_decay=1e-2)
                     for w in (12, 16, 16, 20, 24)])
    test_attributes, test_images, test_sizes = batch(1000, gen)
    noisy = augment(test_images, gen)
    report = {"on_fresh_renders": {
        "proxy": accuracy(proxy, test_images, test_attributes, test_sizes),
        "gold": accuracy(gold, test_images, test_attributes, test_sizes),
        "proxy_augmented": accuracy(proxy, noisy, test_attributes, test_sizes),
        "gold_augmented": accuracy(gold, noisy, test_attributes, test_sizes),
    }, "seconds": round(time.perf_counter() - t0, 1)}
    save_ensemble(proxy, tmp / "proxy.safetensors", "proxy")
    save_ensemble(gold, tmp / "gold.safetensors", "gold")
    return gold, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "comfy_rft" / "toyworld"))
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every training length (0.1: smoke test).")
    parser.add_argument("--only", choices=("all", "classifiers"), default="all",
                        help="classifiers: rebuild only the proxy and gold classifiers (seconds), keep the model.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    def steps(n: int) -> int:
        return max(1, int(n * args.scale))

    tmp = Path(tempfile.mkdtemp(prefix="toyworld-"))
    previous = out / "build_report.json"
    if args.only == "all":
        report = {"seed": SEED, "scale": args.scale, "model": build_model(tmp, steps, log)}
    else:
        report = json.loads(previous.read_text()) if previous.exists() else {"seed": SEED, "model": "built earlier"}
        shutil.copytree(out / "model", tmp / "model")
    gold, report["classifiers"] = build_classifiers(tmp, steps)
    log(json.dumps(report["classifiers"]))
    t0 = time.perf_counter()
    report["base_model"] = caption_accuracy(tmp / "model", gold, per_caption=max(1, int(8 * args.scale)),
                                            steps=SAMPLING_STEPS, guidance=GUIDANCE)
    report["base_model"]["seconds"] = round(time.perf_counter() - t0, 1)
    (tmp / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    for item in tmp.iterdir():
        shutil.move(str(item), out / item.name)
    shutil.rmtree(tmp, ignore_errors=True)
    log(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
