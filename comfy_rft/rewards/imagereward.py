"""ImageReward v1.0 in plain torch: BLIP ViT-L/16 + BERT with cross-attention + a linear MLP head.

A compact re-implementation of the scoring path of ImageReward (Xu et al., "ImageReward: Learning and
Evaluating Human Preferences for Text-to-Image Generation", https://github.com/THUDM/ImageReward,
Apache-2.0), whose model is built on BLIP (https://github.com/salesforce/BLIP, BSD-3-Clause) and
the Hugging Face BERT code. Written from those designs, not copied; no timm, fairscale, torchvision
or `image-reward` package is needed.

Module and parameter names match `ImageReward.pt` exactly, so the published state dict loads with
`strict=True` and no renaming:

    blip.visual_encoder.{patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj,
                         norm2, mlp.fc1, mlp.fc2}, norm}                      (pre-LN ViT, fused qkv)
    blip.text_encoder.embeddings.{word_embeddings, position_embeddings, LayerNorm}   (no token types)
    blip.text_encoder.encoder.layer.N.{attention, crossattention}.{self.{query,key,value},
                         output.{dense,LayerNorm}}, intermediate.dense, output.{dense,LayerNorm}
    mlp.layers.{0,2,4,6,7}                 (Linear 768→1024→128→64→16→1, dropout between, no activations)

Keys that upstream's `load_state_dict(strict=False)` also leaves unused (BLIP's contrastive
projections `vision_proj`/`text_proj`, the `position_ids` buffer, other BLIP pre-training heads) are
dropped with a log line; any other key is an error.

Score (upstream `ImageReward.score_gard`, the ReFL path): tokens `[CLS] prompt [SEP] [PAD]…`
(max_length 35; upstream keeps [CLS] first, it does not substitute [ENC]), image resized (shortest
side, bicubic, antialiased) and centre-cropped to the ViT's size with OpenAI-CLIP normalisation,
`mlp(text_encoder(ids, mask, encoder_hidden_states=vit(image)).last_hidden_state[:, 0])`, then
standardised with ImageReward's mean/std. Differentiable w.r.t. the pixels.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Reward
from .preprocess import clip_preprocess
from .weights import _hf_cache, find_weights

log = logging.getLogger(__name__)

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TOKENS = 35

CHECKPOINT_REPOS = ("THUDM/ImageReward", "zai-org/ImageReward")
BERT_REPOS = ("google-bert/bert-base-uncased", "bert-base-uncased")
PUBLISHED = {
    "ImageReward.pt": "https://huggingface.co/THUDM/ImageReward (file ImageReward.pt; also zai-org/ImageReward)",
    "med_config.json": "https://huggingface.co/THUDM/ImageReward (file med_config.json; also zai-org/ImageReward)",
    "bert-base-uncased": "https://huggingface.co/google-bert/bert-base-uncased (vocab.txt: put it in a folder "
                         "named bert-base-uncased, or pass bert=PATH to the folder or to vocab.txt)",
}

# Checkpoint entries upstream never uses for the score (loaded with strict=False there).
_IGNORED_EXACT = {"blip.text_encoder.embeddings.position_ids", "blip.temp", "blip.image_queue", "blip.text_queue",
                  "blip.idx_queue", "blip.queue_ptr", "blip.ptr_queue"}
_IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.pooler.", "blip.visual_encoder_m.",
                     "blip.text_encoder_m.", "blip.vision_proj_m.", "blip.text_proj_m.", "blip.text_decoder.",
                     "blip.itm_head.")
_USED_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")


# ---------------------------------------------------------------- vision: BLIP's ViT (timm layout)

class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _ViTMlp(width, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Pre-LN ViT: patches + [CLS] + learned positions, blocks, final LayerNorm; returns all tokens."""

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int, hidden: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = _PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(_ViTBlock(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels):
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, :x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------- text: BLIP's "med" BERT encoder

class _BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, context: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context, hidden)
        self.value = nn.Linear(context, hidden)

    def forward(self, x, context, mask):
        b = x.shape[0]

        def split(t):
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)),
                                             split(self.value(context)), attn_mask=mask)
        return out.transpose(1, 2).reshape(x.shape)


class _BertAddNorm(nn.Module):
    def __init__(self, inner: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, context: int, eps: float):
        super().__init__()
        self.self = _BertSelfAttention(hidden, heads, context)
        self.output = _BertAddNorm(hidden, hidden, eps)

    def forward(self, x, context, mask=None):
        return self.output(self.self(x, context, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, hidden: int, inner: int, act):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.act = act

    def forward(self, x):
        return self.act(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, vision_width: int, eps: float, act):
        super().__init__()
        self.attention = _BertAttention(hidden, heads, hidden, eps)
        self.crossattention = _BertAttention(hidden, heads, vision_width, eps)
        self.intermediate = _BertIntermediate(hidden, inner, act)
        self.output = _BertAddNorm(inner, hidden, eps)

    def forward(self, x, mask, image_embeds):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image_embeds)  # every image token is attended (mask of ones)
        return self.output(self.intermediate(x), x)


class _BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, hidden: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class _BertEncoder(nn.Module):
    def __init__(self, layers: list[_BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    """BLIP's BERT (post-LN) with a cross-attention block in every layer; returns the last hidden state."""

    def __init__(self, config: dict, vision_width: int):
        super().__init__()
        from transformers.activations import ACT2FN

        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.embeddings = _BertEmbeddings(config["vocab_size"], config["max_position_embeddings"], hidden, eps)
        self.encoder = _BertEncoder([
            _BertLayer(hidden, config["num_attention_heads"], config["intermediate_size"], vision_width, eps,
                       ACT2FN[config["hidden_act"]])
            for _ in range(config["num_hidden_layers"])])

    def forward(self, ids, attention_mask, image_embeds):
        x = self.embeddings(ids)
        # BERT's additive padding mask, as upstream: (1 - mask) * -10000
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, mask, image_embeds)
        return x


class _Blip(nn.Module):
    def __init__(self, visual_encoder: VisionTransformer, text_encoder: TextEncoder):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder


class _MLP(nn.Module):
    """ImageReward's head: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear."""

    def __init__(self, dims: list[int]):
        super().__init__()
        a, b, c, d, e, f = dims
        self.layers = nn.Sequential(nn.Linear(a, b), nn.Dropout(0.2), nn.Linear(b, c), nn.Dropout(0.2),
                                    nn.Linear(c, d), nn.Dropout(0.1), nn.Linear(d, e), nn.Linear(e, f))

    def forward(self, x):
        return self.layers(x)


# ---------------------------------------------------------------- the reward

class ImageReward(Reward):
    """ImageReward v1.0 score (standardised; ≈ −2…+2), differentiable w.r.t. the pixels."""

    name = "imagereward"
    differentiable = True
    typical_range = (-2.0, 2.0)

    def __init__(self, blip: _Blip, mlp: _MLP, tokenizer, max_tokens: int = MAX_TOKENS):
        super().__init__()
        self.blip = blip
        self.mlp = mlp
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask [B, 35] (each distinct prompt is tokenised once)."""
        for p in dict.fromkeys(prompts):
            if p not in self._token_cache:
                out = self.tokenizer(p, padding="max_length", truncation=True, max_length=self.max_tokens,
                                     return_tensors="pt")
                self._token_cache[p] = (out["input_ids"][0], out["attention_mask"][0])
        ids, mask = zip(*(self._token_cache[p] for p in prompts))
        return torch.stack(ids), torch.stack(mask)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"imagereward: {images.shape[0]} images but {len(prompts)} prompts")
        param = self.blip.visual_encoder.cls_token
        ids, mask = (t.to(param.device) for t in self.tokens(list(prompts)))
        pixels = clip_preprocess(images.to(device=param.device, dtype=param.dtype),
                                 self.blip.visual_encoder.image_size, mode="crop")
        image_embeds = self.blip.visual_encoder(pixels)
        hidden = self.blip.text_encoder(ids, mask, image_embeds)
        return ((self.mlp(hidden[:, 0]).squeeze(-1) - SCORE_MEAN) / SCORE_STD).float()


# ---------------------------------------------------------------- loading

def _locate(name: str, explicit: str | None, option: str, repos: tuple[str, ...], filename: str | None) -> Path:
    try:
        return find_weights("imagereward", name, explicit=explicit, option=option, hf_repo=repos[0],
                            hf_filename=filename, published=PUBLISHED[name])
    except UserError:
        if not explicit:
            for repo in repos[1:]:
                cached = _hf_cache(repo, filename)
                if cached is not None:
                    return cached
        raise


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                log.warning("imagereward: %s does not load with weights_only=True (%s); loading it as a full "
                            "pickle: only do this with a file from a source you trust", path, str(err).splitlines()[0])
                state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise UserError(f"imagereward: cannot read checkpoint {path}: {err}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"imagereward: {path} is not a state dict of tensors (expected ImageReward.pt from "
                        f"{PUBLISHED['ImageReward.pt']})")
    return dict(state)


def _split_keys(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The entries the score uses; known unused ones are dropped (logged), unknown ones are an error."""
    used, ignored, unknown = {}, [], []
    for key, value in state.items():
        if key in _IGNORED_EXACT or key.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
        elif key.startswith(_USED_PREFIXES):
            used[key] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise UserError(f"imagereward: {path} has keys an ImageReward checkpoint does not have: {shown}. Expected "
                        f"blip.visual_encoder.*, blip.text_encoder.* and mlp.layers.* (ImageReward.pt from "
                        f"{PUBLISHED['ImageReward.pt']}).")
    if ignored:
        log.info("imagereward: ignoring %d checkpoint entries the score does not use (%s…)", len(ignored),
                 ", ".join(sorted(ignored)[:3]))
    return used


def _need(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise UserError(f"imagereward: {path} lacks {key}; is it ImageReward.pt ({PUBLISHED['ImageReward.pt']})?")
    return state[key]


def _read_med_config(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"imagereward: cannot read {path}: {err}") from None
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size")
    missing = [k for k in required if k not in raw]
    if missing:
        raise UserError(f"imagereward: {path} lacks {', '.join(missing)}; expected BLIP's med_config.json "
                        f"({PUBLISHED['med_config.json']})")
    config = {"layer_norm_eps": 1e-12, "hidden_act": "gelu", **raw}
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"imagereward: {path}: only position_embedding_type 'absolute' is supported")
    if not config.get("add_cross_attention", True):
        raise UserError(f"imagereward: {path}: add_cross_attention must be true (ImageReward cross-attends to the image)")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise UserError(f"imagereward: {path}: hidden_size is not a multiple of num_attention_heads")
    if config["max_position_embeddings"] < MAX_TOKENS:
        raise UserError(f"imagereward: {path}: max_position_embeddings must be at least {MAX_TOKENS}")
    from transformers.activations import ACT2FN

    if config["hidden_act"] not in ACT2FN:
        raise UserError(f"imagereward: {path}: unknown hidden_act {config['hidden_act']!r}")
    return config


def _load_tokenizer(path: Path, vocab_size: int):
    from transformers import BertTokenizer

    vocab = path / "vocab.txt" if path.is_dir() else path
    if not vocab.is_file():
        raise UserError(f"imagereward: no vocab.txt in {path}. It is published at {PUBLISHED['bert-base-uncased']}")
    tokenizer = BertTokenizer(vocab=str(vocab), do_lower_case=True)
    # BLIP's two extra specials (ids 30522/30523 for bert-base-uncased); ImageReward scores with [CLS] first.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) > vocab_size:
        raise UserError(f"imagereward: {vocab} has {len(tokenizer) - 2} tokens (+[DEC], [ENC]) but med_config's "
                        f"vocab_size is {vocab_size}: not the bert-base-uncased vocabulary")
    return tokenizer


def build(state: dict[str, torch.Tensor], config: dict, tokenizer, path: Path,
          vit_heads: int | None = None) -> ImageReward:
    """The model, sized from `config` (BERT) and the checkpoint's shapes (ViT, head), weights loaded strictly."""
    patch_w = _need(state, "blip.visual_encoder.patch_embed.proj.weight", path)
    pos = _need(state, "blip.visual_encoder.pos_embed", path)
    fc1 = _need(state, "blip.visual_encoder.blocks.0.mlp.fc1.weight", path)
    width, patch = patch_w.shape[0], patch_w.shape[-1]
    grid = round((pos.shape[1] - 1) ** 0.5)
    if grid * grid != pos.shape[1] - 1:
        raise UserError(f"imagereward: {path}: pos_embed has {pos.shape[1] - 1} patches, not a square grid")
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks."))
    heads = vit_heads if vit_heads is not None else width // 64
    if heads < 1 or width % heads:
        raise UserError(f"imagereward: ViT width {width} is not divisible into {heads} heads; pass vit_heads=N")
    dims = [_need(state, "mlp.layers.0.weight", path).shape[1]]
    dims += [_need(state, f"mlp.layers.{i}.weight", path).shape[0] for i in (0, 2, 4, 6, 7)]
    if dims[0] != config["hidden_size"] or dims[-1] != 1:
        raise UserError(f"imagereward: {path}: the MLP head maps {dims[0]} → {dims[-1]}, but the text encoder's "
                        f"width is {config['hidden_size']} and the score is one number")

    with torch.device("meta"):
        vit = VisionTransformer(grid * patch, patch, width, depth, heads, fc1.shape[0])
        model = ImageReward(_Blip(vit, TextEncoder(config, width)), _MLP(dims), tokenizer)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise UserError(f"imagereward: {path} does not fit the model that med_config.json describes "
                        f"({config['num_hidden_layers']} BERT layers of {config['hidden_size']}, ViT {depth}×{width}):"
                        f"\n{err}") from None
    return model.float()


def imagereward(checkpoint: str | None = None, med_config: str | None = None, bert: str | None = None,
                vit_heads: str | None = None) -> ImageReward:
    """ImageReward v1.0 from local files: `ImageReward.pt`, `med_config.json`, a bert-base-uncased vocab.

    `vit_heads` defaults to width/64 (16 for the ViT-L/16 of v1.0).
    """
    ckpt_path = _locate("ImageReward.pt", checkpoint, "checkpoint", CHECKPOINT_REPOS, "ImageReward.pt")
    config_path = _locate("med_config.json", med_config, "med_config", CHECKPOINT_REPOS, "med_config.json")
    bert_path = _locate("bert-base-uncased", bert, "bert", BERT_REPOS, "vocab.txt")
    try:
        heads = None if vit_heads in (None, "") else int(vit_heads)
    except ValueError:
        raise UserError(f"imagereward: vit_heads={vit_heads} is not a whole number") from None
    config = _read_med_config(config_path)
    tokenizer = _load_tokenizer(bert_path, config["vocab_size"])
    state = _split_keys(_load_state_dict(ckpt_path), ckpt_path)
    return build(state, config, tokenizer, ckpt_path, heads).freeze()
