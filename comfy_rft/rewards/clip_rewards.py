"""CLIP-family rewards: LAION aesthetic v2, HPSv2 / HPSv2.1, PickScore and CLIP score.

Everything runs on `transformers` CLIP classes and plain torch (no open_clip, no torchvision), in
fp32 with frozen weights, so the gradient of a score reaches the pixels. Files are found on disk by
`find_weights` (never downloaded). HPSv2's open_clip checkpoint is converted once to a transformers
folder (`model.safetensors` + `config.json`) beside it and reused afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from .weights import find_weights

logger = logging.getLogger(__name__)

# ---- where the files are published -----------------------------------------------------------------

CLIP_L_NAME = "clip-vit-large-patch14"
CLIP_L_REPO = "openai/clip-vit-large-patch14"
CLIP_L_PUBLISHED = "https://huggingface.co/openai/clip-vit-large-patch14 (a folder with config.json, model.safetensors)"

AESTHETIC_HEAD_NAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_PUBLISHED = ("https://github.com/christophschuhmann/improved-aesthetic-predictor "
                       "(raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth; also ava+logos-l14-reluMSE.pth)")
# TRL's DDPO example re-publishes the same head under another name; found in the local HF cache only.
AESTHETIC_HF_REPO, AESTHETIC_HF_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
HPS_PUBLISHED = "https://huggingface.co/xswu/HPSv2"

CLIP_H_TOKENIZER_NAME = "CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_H_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_H_PUBLISHED = ("https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (only the tokenizer files are "
                    "needed: tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, special_tokens_map.json)")

PICKSCORE_NAME = "PickScore_v1"
PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PUBLISHED = "https://huggingface.co/yuvalkirstain/PickScore_v1 (a CLIPModel folder)"

CONVERSION_FORMAT = 1
STAMP_FILE = "comfy_rft_conversion.json"


# ---- shared helpers --------------------------------------------------------------------------------

def _pooled(output) -> torch.Tensor:
    """transformers 5 returns BaseModelOutputWithPooling from get_*_features; 4.x returned the tensor."""
    return getattr(output, "pooler_output", output)


def _image_stats(folder: Path) -> tuple[tuple, tuple]:
    """image_mean / image_std from a folder's preprocessor_config.json, else OpenAI CLIP's."""
    config = folder / "preprocessor_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
            mean, std = data.get("image_mean"), data.get("image_std")
            if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
                return tuple(float(m) for m in mean), tuple(float(s) for s in std)
        except (OSError, ValueError):
            pass
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _load_pretrained(cls, folder: Path, reward: str, what: str):
    """cls.from_pretrained(folder) offline, in fp32; a missing weight is an error, not a random init."""
    from ..quiet import quiet_libraries

    if not (folder / "config.json").is_file():
        raise UserError(f"{reward}: {folder} is not a transformers model folder (no config.json). "
                        f"Pass the folder of {what}.")
    try:
        with quiet_libraries():
            model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{reward}: cannot load {what} from {folder}: {err}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise UserError(f"{reward}: {folder} lacks weights for {what} ({len(missing)} missing, e.g. "
                        f"{missing[:3]}); it is not the model this reward needs.")
    return model.float()


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _load_tokenizer(folder: Path, reward: str):
    from transformers import CLIPTokenizer

    if not _has_tokenizer(folder):
        raise UserError(f"{reward}: {folder} has no CLIP tokenizer files (tokenizer.json, or vocab.json + "
                        f"merges.txt). Put them there (from {CLIP_H_PUBLISHED}) or pass {reward}(tokenizer=PATH).")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{reward}: cannot load the CLIP tokenizer in {folder}: {err}") from None


def _clip_h_tokenizer_folder(reward: str, explicit: str | None) -> Path:
    return find_weights(reward, CLIP_H_TOKENIZER_NAME, explicit=explicit, option="tokenizer", hf_repo=CLIP_H_REPO,
                        published=CLIP_H_PUBLISHED)


def _int_option(reward: str, key: str, value) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{reward}: {key}={value} must be a whole number") from None
    if number <= 0:
        raise UserError(f"{reward}: {key}={value} must be positive")
    return number


# ---- CLIP image-text similarity (HPSv2, PickScore, CLIP score) --------------------------------------

class ClipSimilarity(Reward):
    """scale * cos(image, text) for each (image, prompt) pair from a transformers `CLIPModel`.

    `mode` is the preprocessing ("crop": shortest side + centre crop; "pad": longest side + zero pad);
    `scale=None` uses the model's own `logit_scale.exp()`; `floor` clips the cosine from below first
    (CLIP score's max(cos, 0)). Prompts are tokenised once, and as the text tower is frozen their
    embeddings are cached too (prompts repeat every step).
    """

    CACHE_LIMIT = 4096

    def __init__(self, model, tokenizer, *, name: str, mode: str, typical_range: tuple[float, float],
                 scale: float | None = 1.0, floor: float | None = None,
                 mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        if mode not in ("crop", "pad"):
            raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
        self.model = model.float()
        self.tokenizer = tokenizer
        self.name, self.mode, self.typical_range = name, mode, typical_range
        self.scale, self.floor = scale, floor
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = int(model.config.vision_config.image_size)
        text_config = model.config.text_config
        self.context_length = int(text_config.max_position_embeddings)
        # eos id 2 is transformers' legacy flag for "pool at argmax(ids)"; otherwise it pools at the
        # first eos id, so the tokenizer must produce that id.
        self._eos = None if text_config.eos_token_id == 2 else text_config.eos_token_id
        self._ids: dict[str, torch.Tensor] = {}
        self._text: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}

    def token_ids(self, prompt: str) -> torch.Tensor:
        ids = self._ids.get(prompt)
        if ids is None:
            ids = self.tokenizer(prompt, padding="max_length", max_length=self.context_length, truncation=True,
                                 return_tensors="pt").input_ids
            if self._eos is not None and not (ids == self._eos).any():
                raise UserError(f"{self.name}: the tokenizer does not end prompts with token id {self._eos}, which "
                                f"the model pools at; use the tokenizer that belongs to this model.")
            if len(self._ids) >= self.CACHE_LIMIT:
                self._ids.clear()
            self._ids[prompt] = ids
        return ids

    def _encode_text(self, prompts: list[str], device) -> torch.Tensor:
        ids = torch.cat([self.token_ids(p) for p in prompts]).to(device)
        return F.normalize(_pooled(self.model.get_text_features(input_ids=ids)), dim=-1)

    def text_embeddings(self, prompts: list[str], device, dtype) -> torch.Tensor:
        """L2-normalised text embeddings [B, D]; cached while the text tower is frozen."""
        if any(p.requires_grad for p in self.model.text_model.parameters()) or any(
                p.requires_grad for p in self.model.text_projection.parameters()):
            return self._encode_text(prompts, device)
        key = (str(device), dtype)
        todo = list(dict.fromkeys(p for p in prompts if (p, *key) not in self._text))
        if todo:
            if len(self._text) + len(todo) > self.CACHE_LIMIT:
                self._text.clear()
            with torch.no_grad():
                embeds = self._encode_text(todo, device)
            self._text.update({(p, *key): e for p, e in zip(todo, embeds)})
        return torch.stack([self._text[(p, *key)] for p in prompts])

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half(): cached embeddings belong to the old ones
        self._text.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B,3,H,W], got {tuple(images.shape)}")
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        dtype = self.model.logit_scale.dtype
        pixels = clip_preprocess(images.to(dtype), self.image_size, self.mode, self.mean, self.std)
        image = F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        text = self.text_embeddings(prompts, image.device, image.dtype)
        cos = (image * text).sum(-1)
        if self.floor is not None:
            cos = cos.clamp_min(self.floor)
        return cos * (self.model.logit_scale.exp() if self.scale is None else self.scale)


# ---- LAION aesthetic predictor v2 --------------------------------------------------------------------

class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: Linear layers (dropout is a no-op at inference), with a
    ReLU after every Linear but the last in the reluMSE variant."""

    def __init__(self, linears: list[nn.Linear], relu: bool):
        super().__init__()
        self.linears = nn.ModuleList(linears)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if self.relu and i < len(self.linears) - 1:
                x = F.relu(x)
        return x


# The layouts the published files use: nn.Sequential indices of the Linear layers.
LINEAR_LAYOUT = (0, 2, 4, 6, 7)  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
RELU_LAYOUT = (0, 3, 6, 9, 11)   # Linear, ReLU, Dropout, ... (ava+logos-l14-reluMSE.pth as trained upstream)


def head_variant(path: Path, indices: tuple[int, ...], variant: str | None) -> str:
    """'linear' or 'relu': the option, else the file name (…linearMSE / …reluMSE), else the key layout."""
    if variant:
        v = variant.strip().lower()
        if v not in ("linear", "relu"):
            raise UserError(f"aesthetic: variant={variant} is not known; use variant=linear or variant=relu")
        return v
    stem = path.name.lower()
    if "relu" in stem:
        return "relu"
    if "linear" in stem:
        return "linear"
    return "relu" if indices == RELU_LAYOUT else "linear"


def load_aesthetic_head(path: Path, in_features: int, variant: str | None = None) -> AestheticHead:
    """The MLP from a `layers.N.weight/bias` state dict (.pth, loaded with weights_only=True)."""
    fix = f"Pass the improved-aesthetic-predictor head (e.g. {AESTHETIC_HEAD_NAME}, published at {AESTHETIC_PUBLISHED})."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled whole module, a broken or non-torch file
        raise UserError(f"aesthetic: {path} is not a plain state dict of tensors ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). {fix}") from None
    pattern = re.compile(r"^layers\.(\d+)\.(weight|bias)$")
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and pattern.match(k) and isinstance(v, torch.Tensor) for k, v in state.items()):
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"aesthetic: {path} does not hold an aesthetic MLP: expected keys layers.N.weight / "
                        f"layers.N.bias, found {keys}. {fix}")
    indices = tuple(sorted({int(pattern.match(k)[1]) for k in state}))
    linears = []
    for i in indices:
        weight, bias = state.get(f"layers.{i}.weight"), state.get(f"layers.{i}.bias")
        if weight is None or bias is None or weight.dim() != 2 or bias.shape != weight.shape[:1]:
            raise UserError(f"aesthetic: {path}: layers.{i} is not a Linear layer (weight and bias). {fix}")
        if linears and weight.shape[1] != linears[-1].out_features:
            raise UserError(f"aesthetic: {path}: layers.{i} takes {weight.shape[1]} inputs but the previous layer "
                            f"gives {linears[-1].out_features}. {fix}")
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight.float())
            linear.bias.copy_(bias.float())
        linears.append(linear)
    if linears[-1].out_features != 1:
        raise UserError(f"aesthetic: {path}: the last layer gives {linears[-1].out_features} outputs, not a score. {fix}")
    if linears[0].in_features != in_features:
        raise UserError(f"aesthetic: the head {path.name} takes {linears[0].in_features}-d embeddings but the CLIP "
                        f"model gives {in_features}-d ones; the published heads belong to CLIP ViT-L/14 "
                        f"({CLIP_L_PUBLISHED}).")
    return AestheticHead(linears, relu=head_variant(path, indices, variant) == "relu")


class AestheticScore(Reward):
    """LAION aesthetic predictor v2: MLP(L2-normalised CLIP ViT-L/14 image embedding), 1–10 scale."""

    name = "aesthetic"
    typical_range = (1.0, 10.0)

    def __init__(self, vision, head: AestheticHead, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.vision = vision.float()
        self.head = head.float()
        self.image_size = int(vision.config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"aesthetic: images must be [B,3,H,W], got {tuple(images.shape)}")
        pixels = clip_preprocess(images.to(self.head.linears[0].weight.dtype), self.image_size, "crop",
                                 self.mean, self.std)
        embeds = self.vision(pixel_values=pixels).image_embeds
        return self.head(F.normalize(embeds, dim=-1)).squeeze(-1)


def aesthetic(clip: str | None = None, head: str | None = None, variant: str | None = None) -> AestheticScore:
    """LAION aesthetic v2. clip=CLIP ViT-L/14 folder, head=MLP .pth (…linearMSE or …reluMSE), variant=linear|relu."""
    from transformers import CLIPVisionModelWithProjection

    clip_dir = find_weights("aesthetic", CLIP_L_NAME, explicit=clip, option="clip", hf_repo=CLIP_L_REPO,
                            published=CLIP_L_PUBLISHED)
    head_path = find_weights("aesthetic", AESTHETIC_HEAD_NAME, explicit=head, option="head",
                             hf_repo=AESTHETIC_HF_REPO, hf_filename=AESTHETIC_HF_FILE, published=AESTHETIC_PUBLISHED)
    if head_path.is_dir():
        raise UserError(f"aesthetic: head={head_path} is a folder; pass the .pth file ({AESTHETIC_HEAD_NAME}).")
    vision = _load_pretrained(CLIPVisionModelWithProjection, clip_dir, "aesthetic", "a CLIP ViT-L/14 model")
    mlp = load_aesthetic_head(head_path, int(vision.config.projection_dim), variant)
    mean, std = _image_stats(clip_dir)
    return AestheticScore(vision, mlp, mean, std).freeze()


# ---- HPSv2: open_clip ViT-H-14 checkpoint -> transformers CLIPModel ----------------------------------

# open_clip's ViT-H/g/bigG vision towers use head widths 80/88/104 (16 heads); the rest use 64.
VISION_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}
IGNORED_OPEN_CLIP_KEYS = ("attn_mask", "visual.attn_mask")


def _heads(width: int, explicit: int | None, default: int, tower: str, option: str) -> int:
    heads = explicit or default
    if heads <= 0 or width % heads:
        raise UserError(f"hpsv2: the {tower} tower is {width} wide, which {heads} attention heads do not divide; "
                        f"pass {option}=N")
    return heads


def convert_open_clip_state_dict(state: dict, text_heads: int | None = None, vision_heads: int | None = None):
    """An open_clip CLIP (ViT) state dict -> (transformers CLIPModel state dict, CLIPConfig).

    The config comes from the tensor shapes (widths, depths, patch, image size, vocabulary, context);
    head counts cannot be seen in shapes: text defaults to width/64, vision to 16 for ViT-H/g/bigG
    widths and width/64 otherwise.
    """
    from transformers import CLIPConfig

    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    used: set[str] = set(k for k in sd if k in IGNORED_OPEN_CLIP_KEYS)

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise UserError(f"hpsv2: the checkpoint is not an open_clip ViT CLIP state dict (no {key}).")
        used.add(key)
        return sd[key]

    def depth(prefix: str) -> int:
        found = {int(m[1]) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        if not found or found != set(range(len(found))):
            raise UserError(f"hpsv2: the checkpoint has no consecutive {prefix}N blocks.")
        return len(found)

    out: dict[str, torch.Tensor] = {}

    def blocks(src: str, dst: str, n: int) -> int:
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            # clone: safetensors refuses tensors that share storage, as chunks of in_proj do
            for name, tensor in zip("qkv", take(s + "attn.in_proj_weight").chunk(3, 0)):
                out[f"{d}self_attn.{name}_proj.weight"] = tensor.clone()
            for name, tensor in zip("qkv", take(s + "attn.in_proj_bias").chunk(3, 0)):
                out[f"{d}self_attn.{name}_proj.bias"] = tensor.clone()
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{d}{b}.weight"] = take(f"{s}{a}.weight")
                out[f"{d}{b}.bias"] = take(f"{s}{a}.bias")
        return int(out[f"{dst}0.mlp.fc1.weight"].shape[0])

    # vision tower
    conv = take("visual.conv1.weight")
    v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    v_pos = take("visual.positional_embedding")
    grid = round((v_pos.shape[0] - 1) ** 0.5)
    if grid * grid + 1 != v_pos.shape[0]:
        raise UserError(f"hpsv2: visual.positional_embedding has {v_pos.shape[0]} rows, not 1 + a square grid.")
    v_layers = depth("visual.transformer.resblocks.")
    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = conv
    out["vision_model.embeddings.position_embedding.weight"] = v_pos
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        out[f"{b}.weight"], out[f"{b}.bias"] = take(f"{a}.weight"), take(f"{a}.bias")
    v_inter = blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.", v_layers)
    v_proj = take("visual.proj")
    out["visual_projection.weight"] = v_proj.t()

    # text tower
    tokens = take("token_embedding.weight")
    vocab, t_width = int(tokens.shape[0]), int(tokens.shape[1])
    t_pos = take("positional_embedding")
    t_layers = depth("transformer.resblocks.")
    out["text_model.embeddings.token_embedding.weight"] = tokens
    out["text_model.embeddings.position_embedding.weight"] = t_pos
    t_inter = blocks("transformer.resblocks.", "text_model.encoder.layers.", t_layers)
    if "text_projection.weight" in sd:  # open_clip variants with an nn.Linear projection
        t_proj = take("text_projection.weight")
    else:
        t_proj = take("text_projection").t()
    out["text_projection.weight"] = t_proj
    out["logit_scale"] = take("logit_scale").reshape(())

    leftover = sorted(set(sd) - used)
    if leftover:
        raise UserError(f"hpsv2: the checkpoint has open_clip parts this converter does not know ({leftover[:5]}"
                        f"{' …' if len(leftover) > 5 else ''}); it is not an HPSv2 ViT-H-14 checkpoint.")
    embed = int(v_proj.shape[1])
    if t_proj.shape[0] != embed:
        raise UserError(f"hpsv2: image ({embed}) and text ({t_proj.shape[0]}) embeddings differ in size.")
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=embed)
    config = CLIPConfig(
        projection_dim=embed,
        text_config=dict(vocab_size=vocab, hidden_size=t_width, intermediate_size=t_inter, num_hidden_layers=t_layers,
                         num_attention_heads=_heads(t_width, text_heads, max(1, t_width // 64), "text", "text_heads"),
                         max_position_embeddings=int(t_pos.shape[0]),
                         # open_clip pools at argmax(ids) = the end token, the vocabulary's last id (49407)
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0, **common),
        vision_config=dict(hidden_size=v_width, intermediate_size=v_inter, num_hidden_layers=v_layers,
                           num_attention_heads=_heads(v_width, vision_heads,
                                                      VISION_HEADS_BY_WIDTH.get(v_width, max(1, v_width // 64)),
                                                      "vision", "vision_heads"),
                           image_size=grid * patch, patch_size=patch, num_channels=int(conv.shape[1]), **common),
    )
    return {k: v.detach().contiguous() for k, v in out.items()}, config


def load_torch_checkpoint(path: Path, reward: str) -> dict:
    """torch.load with weights_only=True; only a pickle that needs more falls back (with a warning)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a pickle with objects besides tensors and containers
        logger.warning("%s: %s is not loadable with weights_only=True (%s); loading it as a full pickle, which can "
                       "run code from the file: use checkpoints only from sources you trust.", reward, path,
                       str(err).splitlines()[0] if str(err) else "")
    except Exception as err:  # not a torch file at all, truncated, ...
        raise UserError(f"{reward}: cannot read {path} as a torch checkpoint ({type(err).__name__}: {err}).") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"{reward}: cannot read {path} as a torch checkpoint ({type(err).__name__}: {err}).") from None


def _converted_root() -> Path:
    return Path(os.environ.get("COMFY_RFT_CACHE", Path.home() / ".cache" / "comfy_rft")) / "converted"


def _in_hf_cache(path: Path) -> bool:
    return path.parent.parent.name == "snapshots" or any(p.name.startswith("models--") for p in path.parents)


def _writable_dir(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def conversion_folders(checkpoint: Path) -> list[Path]:
    """Where the converted model may live: beside the checkpoint, then the user cache."""
    stem = checkpoint.name.rsplit(".", 1)[0]
    digest = hashlib.sha1(str(checkpoint.resolve()).encode()).hexdigest()[:10]
    folders = [] if _in_hf_cache(checkpoint) else [checkpoint.parent / f"{stem}.hf"]
    return folders + [_converted_root() / f"{stem}-{digest}.hf"]


def _stamp(checkpoint: Path, text_heads, vision_heads) -> dict:
    return {"format": CONVERSION_FORMAT, "source": checkpoint.name, "size": checkpoint.stat().st_size,
            "text_heads": text_heads, "vision_heads": vision_heads}


def _valid_conversion(folder: Path, stamp: dict) -> bool:
    try:
        return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file() and \
            json.loads((folder / STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


def converted_clip_folder(checkpoint: Path, reward: str, text_heads: int | None = None,
                          vision_heads: int | None = None) -> Path:
    """A transformers CLIP folder for an open_clip checkpoint: converted once, then reused."""
    from safetensors.torch import save_file

    stamp = _stamp(checkpoint, text_heads, vision_heads)
    candidates = conversion_folders(checkpoint)
    for folder in candidates:
        if _valid_conversion(folder, stamp):
            return folder
    loaded = load_torch_checkpoint(checkpoint, reward)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{reward}: {checkpoint} does not hold {{'state_dict': open_clip tensors}}; pass the "
                        f"HPSv2 checkpoint (published at {HPS_PUBLISHED}).")
    tensors, config = convert_open_clip_state_dict(state, text_heads, vision_heads)
    del loaded, state
    for folder in candidates:
        if not folder.parent.exists():
            try:
                folder.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
        if not _writable_dir(folder.parent):
            continue
        print(f"{reward}: converting {checkpoint.name} (open_clip) to a transformers folder {folder} "
              f"(once; later runs reuse it)", file=sys.stderr, flush=True)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config.to_json_file(str(tmp / "config.json"))
            (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            return folder
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            logger.warning("%s: could not write %s (%s); trying the next place", reward, folder, err)
    raise UserError(f"{reward}: nowhere to write the converted model; tried {', '.join(map(str, candidates))}. "
                    f"Make one writable or set COMFY_RFT_CACHE.")


def hpsv2(checkpoint: str | None = None, tokenizer: str | None = None, version: str = "2.0",
          text_heads: str | None = None, vision_heads: str | None = None) -> ClipSimilarity:
    """HPSv2 (version=2.0) or HPSv2.1: cos(image, text) of the HPS-tuned open_clip ViT-H-14."""
    v = str(version).strip().lower().lstrip("v")
    v = {"2": "2.0", "2.0": "2.0", "2.1": "2.1"}.get(v)
    if v is None:
        raise UserError(f"hpsv2: version={version} is not known; use version=2.0 or version=2.1")
    name = "hpsv2" if v == "2.0" else "hpsv2.1"
    t_heads, v_heads = _int_option(name, "text_heads", text_heads), _int_option(name, "vision_heads", vision_heads)
    filename = HPS_FILES[v]
    ckpt = find_weights(name, filename, explicit=checkpoint, option="checkpoint", hf_repo=HPS_REPO,
                        hf_filename=filename, published=HPS_PUBLISHED)
    if ckpt.is_dir():
        raise UserError(f"{name}: checkpoint={ckpt} is a folder; pass the file {filename}.")
    tok = _load_tokenizer(_clip_h_tokenizer_folder(name, tokenizer), name)
    from transformers import CLIPModel

    model = _load_pretrained(CLIPModel, converted_clip_folder(ckpt, name, t_heads, v_heads), name,
                             f"the converted {filename}")
    reward = ClipSimilarity(model, tok, name=name, mode="pad", scale=1.0, typical_range=(0.2, 0.35))
    return reward.freeze()


def hpsv2_1(checkpoint: str | None = None, tokenizer: str | None = None, text_heads: str | None = None,
            vision_heads: str | None = None) -> ClipSimilarity:
    """HPSv2.1 (HPS_v2.1_compressed.pt)."""
    return hpsv2(checkpoint, tokenizer, "2.1", text_heads, vision_heads)


# ---- PickScore and CLIP score ------------------------------------------------------------------------

def pickscore(model: str | None = None, tokenizer: str | None = None) -> ClipSimilarity:
    """PickScore v1: logit_scale.exp() * cos of a CLIP-H fine-tuned on Pick-a-Pic."""
    from transformers import CLIPModel

    folder = find_weights("pickscore", PICKSCORE_NAME, explicit=model, option="model", hf_repo=PICKSCORE_REPO,
                          published=PICKSCORE_PUBLISHED)
    if tokenizer is None and _has_tokenizer(folder):
        tok_folder = folder
    else:
        tok_folder = _clip_h_tokenizer_folder("pickscore", tokenizer)
    tok = _load_tokenizer(tok_folder, "pickscore")
    clip = _load_pretrained(CLIPModel, folder, "pickscore", "PickScore_v1 (a CLIPModel)")
    mean, std = _image_stats(folder)
    return ClipSimilarity(clip, tok, name="pickscore", mode="crop", scale=None, typical_range=(17.0, 24.0),
                          mean=mean, std=std).freeze()


def clipscore(model: str | None = None) -> ClipSimilarity:
    """CLIP score (torchmetrics convention): 100 * max(cos(image, text), 0); any CLIP folder with its tokenizer."""
    from transformers import CLIPModel

    folder = find_weights("clipscore", CLIP_L_NAME, explicit=model, option="model", hf_repo=CLIP_L_REPO,
                          published=CLIP_L_PUBLISHED + " with its tokenizer files")
    if not _has_tokenizer(folder):
        raise UserError(f"clipscore: {folder} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
                        f"a CLIP folder for clipscore needs them, as in {CLIP_L_PUBLISHED}.")
    tok = _load_tokenizer(folder, "clipscore")
    clip = _load_pretrained(CLIPModel, folder, "clipscore", "a CLIP model (CLIPModel)")
    mean, std = _image_stats(folder)
    return ClipSimilarity(clip, tok, name="clipscore", mode="crop", scale=100.0, floor=0.0,
                          typical_range=(20.0, 35.0), mean=mean, std=std).freeze()
