"""CLIP-family rewards (aesthetic, HPSv2/2.1, PickScore, CLIP score) on tiny random weights written in
the upstream file formats, checked against reference forwards written here from the raw tensors."""

import argparse
import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from comfy_rft.errors import UserError
from comfy_rft.rewards import BUILTINS, load_reward

torch.set_num_threads(1)

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red cube on a table", "a photo of a cat"]
ATOL = 1e-5


# ---- tiny upstream-format files ----------------------------------------------------------------------

def _tokenizer():
    from comfy_rft.tiny import byte_level_clip_tokenizer

    return byte_level_clip_tokenizer()  # 514 tokens, <|endoftext|> = 513 = the largest id, like 49407


def _tiny_clip(seed: int):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        projection_dim=32,
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                         projection_dim=32),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4, projection_dim=32))
    model = CLIPModel(config)
    with torch.no_grad():  # bigger-than-init weights so every score and gradient is clearly non-trivial
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0, 0.2)
        model.logit_scale.fill_(math.log(100.0))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny folder/file per upstream artefact, built once."""
    root = tmp_path_factory.mktemp("upstream")
    tok = _tokenizer()
    out = {}
    # openai/clip-vit-large-patch14: a full CLIPModel folder with its tokenizer files
    out["clip"] = root / "clip-vit-large-patch14"
    _tiny_clip(7).save_pretrained(out["clip"])  # seed 7: cos > 0 for PROMPTS
    tok.save_pretrained(out["clip"])
    # yuvalkirstain/PickScore_v1: a CLIPModel folder without tokenizer; the laion CLIP-H tokenizer folder
    out["pickscore"] = root / "PickScore_v1"
    _tiny_clip(2).save_pretrained(out["pickscore"])
    out["tokenizer"] = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    tok.save_pretrained(out["tokenizer"])
    # xswu/HPSv2: torch pickle {'state_dict': open_clip ViT state dict}
    out["hps_state"] = _open_clip_state_dict(seed=3)
    out["hps_dir"] = root / "hps"
    out["hps_dir"].mkdir()
    out["hps"] = out["hps_dir"] / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": out["hps_state"]}, out["hps"])
    # improved-aesthetic-predictor head: plain state dict, layers.{0,2,4,6,7}, input = projection dim 32
    torch.manual_seed(4)
    sizes = [32, 24, 16, 12, 8, 1]
    out["head_state"] = {}
    for index, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        out["head_state"][f"layers.{index}.weight"] = torch.randn(o, i) * (1.5 / math.sqrt(i))
        out["head_state"][f"layers.{index}.bias"] = torch.randn(o) * 0.3
    out["head"] = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(out["head_state"], out["head"])
    return out


# Tiny open_clip "ViT-H": vision 40 wide (head width 10, 4 heads), text 32 wide (4 heads), embed 24.
V_WIDTH, V_LAYERS, V_MLP, PATCH, GRID = 40, 2, 64, 4, 8
T_WIDTH, T_LAYERS, T_MLP, VOCAB, CTX, EMBED, HEADS = 32, 3, 48, 514, 77, 24, 4
HPS_OPTIONS = "text_heads=4, vision_heads=4"


def _open_clip_state_dict(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, width):
        return {f"{prefix}.weight": 1 + rnd(width, scale=0.1), f"{prefix}.bias": rnd(width, scale=0.1)}

    def resblocks(prefix, width, mlp, layers):
        sd = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            sd.update(ln(p + "ln_1", width))
            sd.update(ln(p + "ln_2", width))
            sd[p + "attn.in_proj_weight"] = rnd(3 * width, width)
            sd[p + "attn.in_proj_bias"] = rnd(3 * width, scale=0.05)
            sd[p + "attn.out_proj.weight"] = rnd(width, width)
            sd[p + "attn.out_proj.bias"] = rnd(width, scale=0.05)
            sd[p + "mlp.c_fc.weight"] = rnd(mlp, width)
            sd[p + "mlp.c_fc.bias"] = rnd(mlp, scale=0.05)
            sd[p + "mlp.c_proj.weight"] = rnd(width, mlp)
            sd[p + "mlp.c_proj.bias"] = rnd(width, scale=0.05)
        return sd

    sd = {
        "positional_embedding": rnd(CTX, T_WIDTH),
        "text_projection": rnd(T_WIDTH, EMBED),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "visual.class_embedding": rnd(V_WIDTH),
        "visual.positional_embedding": rnd(GRID * GRID + 1, V_WIDTH),
        "visual.proj": rnd(V_WIDTH, EMBED),
        "visual.conv1.weight": rnd(V_WIDTH, 3, PATCH, PATCH),
        "token_embedding.weight": rnd(VOCAB, T_WIDTH),
    }
    sd.update(ln("visual.ln_pre", V_WIDTH))
    sd.update(ln("visual.ln_post", V_WIDTH))
    sd.update(ln("ln_final", T_WIDTH))
    sd.update(resblocks("visual.", V_WIDTH, V_MLP, V_LAYERS))
    sd.update(resblocks("", T_WIDTH, T_MLP, T_LAYERS))
    return sd


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real reward folder, HF cache or user cache is visible."""
    import huggingface_hub.constants

    for var in ("COMFYUI_DIR", "COMFYUI_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    rewards = tmp_path / "rewards"
    rewards.mkdir()
    monkeypatch.setenv("COMFY_RFT_REWARDS_DIR", str(rewards))
    monkeypatch.setenv("COMFY_RFT_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return rewards


# ---- reference forwards written from the raw tensors ---------------------------------------------------

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def ref_transformer(x, blocks, heads, act, causal):
    """Pre-LN residual blocks: x + attn(ln_1(x)); x + mlp(ln_2(x)); attention from a fused qkv."""
    for b in blocks:
        n, length, width = x.shape
        h = F.layer_norm(x, (width,), b["ln1w"], b["ln1b"], 1e-5)
        q, k, v = (h @ b["qkvw"].T + b["qkvb"]).chunk(3, -1)
        q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
        if causal:
            scores = scores + torch.full((length, length), float("-inf")).triu(1)
        h = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
        x = x + h @ b["outw"].T + b["outb"]
        h = F.layer_norm(x, (width,), b["ln2w"], b["ln2b"], 1e-5)
        x = x + act(h @ b["fc1w"].T + b["fc1b"]) @ b["fc2w"].T + b["fc2b"]
    return x


def ref_image(pixels, t, heads, act):
    """ViT: patches + class token + positions, ln_pre, blocks, ln_post on the class token, projection."""
    x = F.conv2d(pixels, t["conv"], stride=t["conv"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([t["cls"].expand(x.shape[0], 1, -1), x], 1) + t["pos"]
    x = F.layer_norm(x, x.shape[-1:], t["pre_w"], t["pre_b"], 1e-5)
    x = ref_transformer(x, t["blocks"], heads, act, causal=False)
    x = F.layer_norm(x[:, 0], x.shape[-1:], t["post_w"], t["post_b"], 1e-5)
    return x @ t["proj"]


def ref_text(ids, t, heads, act):
    """Causal text transformer pooled at the end token = argmax(ids), then the projection."""
    x = t["tok"][ids] + t["pos"][: ids.shape[1]]
    x = ref_transformer(x, t["blocks"], heads, act, causal=True)
    x = F.layer_norm(x, x.shape[-1:], t["final_w"], t["final_b"], 1e-5)
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ t["proj"]


def open_clip_towers(sd):
    def blocks(prefix):
        n = len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
        return [{"ln1w": sd[f"{prefix}{i}.ln_1.weight"], "ln1b": sd[f"{prefix}{i}.ln_1.bias"],
                 "qkvw": sd[f"{prefix}{i}.attn.in_proj_weight"], "qkvb": sd[f"{prefix}{i}.attn.in_proj_bias"],
                 "outw": sd[f"{prefix}{i}.attn.out_proj.weight"], "outb": sd[f"{prefix}{i}.attn.out_proj.bias"],
                 "ln2w": sd[f"{prefix}{i}.ln_2.weight"], "ln2b": sd[f"{prefix}{i}.ln_2.bias"],
                 "fc1w": sd[f"{prefix}{i}.mlp.c_fc.weight"], "fc1b": sd[f"{prefix}{i}.mlp.c_fc.bias"],
                 "fc2w": sd[f"{prefix}{i}.mlp.c_proj.weight"], "fc2b": sd[f"{prefix}{i}.mlp.c_proj.bias"]}
                for i in range(n)]

    image = {"conv": sd["visual.conv1.weight"], "cls": sd["visual.class_embedding"],
             "pos": sd["visual.positional_embedding"], "pre_w": sd["visual.ln_pre.weight"],
             "pre_b": sd["visual.ln_pre.bias"], "blocks": blocks("visual.transformer.resblocks."),
             "post_w": sd["visual.ln_post.weight"], "post_b": sd["visual.ln_post.bias"], "proj": sd["visual.proj"]}
    text = {"tok": sd["token_embedding.weight"], "pos": sd["positional_embedding"],
            "blocks": blocks("transformer.resblocks."), "final_w": sd["ln_final.weight"],
            "final_b": sd["ln_final.bias"], "proj": sd["text_projection"]}
    return image, text


def hf_towers(folder):
    sd = load_file(str(folder / "model.safetensors"))

    def blocks(prefix):
        n = len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
        out = []
        for i in range(n):
            p = f"{prefix}{i}."
            out.append({
                "ln1w": sd[p + "layer_norm1.weight"], "ln1b": sd[p + "layer_norm1.bias"],
                "qkvw": torch.cat([sd[f"{p}self_attn.{c}_proj.weight"] for c in "qkv"]),
                "qkvb": torch.cat([sd[f"{p}self_attn.{c}_proj.bias"] for c in "qkv"]),
                "outw": sd[p + "self_attn.out_proj.weight"], "outb": sd[p + "self_attn.out_proj.bias"],
                "ln2w": sd[p + "layer_norm2.weight"], "ln2b": sd[p + "layer_norm2.bias"],
                "fc1w": sd[p + "mlp.fc1.weight"], "fc1b": sd[p + "mlp.fc1.bias"],
                "fc2w": sd[p + "mlp.fc2.weight"], "fc2b": sd[p + "mlp.fc2.bias"]})
        return out

    v, t = "vision_model.", "text_model."
    image = {"conv": sd[v + "embeddings.patch_embedding.weight"], "cls": sd[v + "embeddings.class_embedding"],
             "pos": sd[v + "embeddings.position_embedding.weight"], "pre_w": sd[v + "pre_layrnorm.weight"],
             "pre_b": sd[v + "pre_layrnorm.bias"], "blocks": blocks(v + "encoder.layers."),
             "post_w": sd[v + "post_layernorm.weight"], "post_b": sd[v + "post_layernorm.bias"],
             "proj": sd["visual_projection.weight"].T}
    text = {"tok": sd[t + "embeddings.token_embedding.weight"], "pos": sd[t + "embeddings.position_embedding.weight"],
            "blocks": blocks(t + "encoder.layers."), "final_w": sd[t + "final_layer_norm.weight"],
            "final_b": sd[t + "final_layer_norm.bias"], "proj": sd["text_projection.weight"].T}
    return image, text, sd["logit_scale"]


def normalise(x):
    return x / x.norm(dim=-1, keepdim=True)


def ref_ids(prompts):
    return _tokenizer()(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def images_for(size_h, size_w, seed=0):
    return torch.rand(2, 3, size_h, size_w, generator=torch.Generator().manual_seed(seed))


def crop_pixels(images):
    """32 px high, wider: shortest side is already 32, so "crop" = the centre 32 columns."""
    left = (images.shape[-1] - 32) // 2
    return (images[..., left:left + 32] - MEAN) / STD


def pad_pixels(images):
    """32 px wide, shorter: longest side is already 32, so "pad" = zero rows above and below."""
    pad = 32 - images.shape[-2]
    return (F.pad(images, (0, 0, pad // 2, pad - pad // 2)) - MEAN) / STD


def ref_head(emb, state, relu):
    indices = sorted({int(k.split(".")[1]) for k in state})
    for n, i in enumerate(indices):
        emb = emb @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        if relu and n < len(indices) - 1:
            emb = emb.clamp_min(0)
    return emb.squeeze(-1)


def check_gradients(reward, images, prompts):
    images = images.clone().requires_grad_(True)
    reward(images, prompts).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


# ---- the rewards --------------------------------------------------------------------------------------

def test_builtins_registered():
    for name in ("aesthetic", "hpsv2", "hpsv2.1", "pickscore", "clipscore"):
        assert name in BUILTINS and BUILTINS[name].differentiable
    assert "github.com/christophschuhmann/improved-aesthetic-predictor" in BUILTINS["aesthetic"].files
    assert "HPS_v2.1_compressed.pt" in BUILTINS["hpsv2.1"].files and "xswu/HPSv2" in BUILTINS["hpsv2.1"].files


def test_aesthetic_matches_reference_and_backpropagates(files):
    reward = load_reward(f"aesthetic(clip={files['clip']}, head={files['head']})")
    assert reward.name == "aesthetic" and reward.typical_range == (1, 10)
    images = images_for(32, 48)
    image_t, _, _ = hf_towers(files["clip"])
    emb = normalise(ref_image(crop_pixels(images), image_t, 4, quick_gelu))
    expected = ref_head(emb, files["head_state"], relu=False)
    got = reward(images, PROMPTS)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got[0] - got[1]).abs() > 1e-3
    check_gradients(reward, images, PROMPTS)


def test_aesthetic_default_names_in_rewards_dir(files, isolated):
    shutil.copytree(files["clip"], isolated / "clip-vit-large-patch14")
    shutil.copy(files["head"], isolated / "sac+logos+ava1-l14-linearMSE.pth")
    images = images_for(32, 48)
    explicit = load_reward(f"aesthetic(clip={files['clip']}, head={files['head']})")
    torch.testing.assert_close(load_reward("aesthetic")(images, PROMPTS), explicit(images, PROMPTS))


def test_aesthetic_head_variant_from_file_name(files, tmp_path):
    images = images_for(32, 48)
    image_t, _, _ = hf_towers(files["clip"])
    emb = normalise(ref_image(crop_pixels(images), image_t, 4, quick_gelu))
    linear, relu = ref_head(emb, files["head_state"], False), ref_head(emb, files["head_state"], True)
    assert (linear - relu).abs().max() > 1e-3  # the variants are distinguishable on these weights
    for name, expected in (("ava+logos-l14-linearMSE.pth", linear), ("ava+logos-l14-reluMSE.pth", relu),
                           ("my-head.pth", linear)):
        path = tmp_path / name
        torch.save(files["head_state"], path)
        got = load_reward(f"aesthetic(clip={files['clip']}, head={path})")(images, PROMPTS)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=name)
    # the option overrides the name
    got = load_reward(f"aesthetic(clip={files['clip']}, head={tmp_path / 'ava+logos-l14-linearMSE.pth'}, "
                      f"variant=relu)")(images, PROMPTS)
    torch.testing.assert_close(got, relu, atol=ATOL, rtol=0)
    # upstream's reluMSE training script's nn.Sequential (Linear, ReLU, Dropout, ...): layers.{0,3,6,9,11}
    renamed = {k.replace(f"layers.{a}.", f"layers.{b}."): v for k, v in files["head_state"].items()
               for a, b in zip((0, 2, 4, 6, 7), (0, 3, 6, 9, 11)) if k.startswith(f"layers.{a}.")}
    torch.save(renamed, tmp_path / "head-sequential-relu.pth")
    torch.save(renamed, tmp_path / "unnamed.pth")
    for name in ("head-sequential-relu.pth", "unnamed.pth"):
        got = load_reward(f"aesthetic(clip={files['clip']}, head={tmp_path / name})")(images, PROMPTS)
        torch.testing.assert_close(got, relu, atol=ATOL, rtol=0, msg=name)


def test_aesthetic_rejects_other_files(files, tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"model.fc.weight": torch.zeros(1, 32)}, bad)
    with pytest.raises(UserError, match=r"layers\.N\.weight.*model\.fc\.weight"):
        load_reward(f"aesthetic(clip={files['clip']}, head={bad})")
    wide = tmp_path / "wide-linearMSE.pth"
    torch.save({"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}, wide)
    with pytest.raises(UserError, match="768-d"):
        load_reward(f"aesthetic(clip={files['clip']}, head={wide})")
    with pytest.raises(UserError, match="variant=linear or variant=relu"):
        load_reward(f"aesthetic(clip={files['clip']}, head={files['head']}, variant=tanh)")


def test_hpsv2_matches_open_clip_reference(files):
    reward = load_reward(f"hpsv2.1(checkpoint={files['hps']}, tokenizer={files['tokenizer']}, {HPS_OPTIONS})")
    assert reward.name == "hpsv2.1" and reward.typical_range == (0.2, 0.35)
    images = images_for(24, 32)
    image_t, text_t = open_clip_towers(files["hps_state"])
    img = normalise(ref_image(pad_pixels(images), image_t, HEADS, F.gelu))
    txt = normalise(ref_text(ref_ids(PROMPTS), text_t, HEADS, F.gelu))
    expected = (img * txt).sum(-1)
    got = reward(images, PROMPTS)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got[0] - got[1]).abs() > 1e-3
    check_gradients(reward, images, PROMPTS)


def test_hpsv2_v20_defaults_module_prefix_and_config(files, isolated):
    state = {f"module.{k}": v for k, v in files["hps_state"].items()}
    torch.save({"state_dict": state}, isolated / "HPS_v2_compressed.pt")
    shutil.copytree(files["tokenizer"], isolated / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    reward = load_reward(f"hpsv2({HPS_OPTIONS})")
    assert reward.name == "hpsv2"
    images = images_for(24, 32)
    image_t, text_t = open_clip_towers(files["hps_state"])
    expected = (normalise(ref_image(pad_pixels(images), image_t, HEADS, F.gelu))
                * normalise(ref_text(ref_ids(PROMPTS), text_t, HEADS, F.gelu))).sum(-1)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=ATOL, rtol=0)
    # the config is read off the tensor shapes
    config = reward.model.config
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.patch_size, v.image_size) == \
        (V_WIDTH, V_LAYERS, V_MLP, PATCH, PATCH * GRID)
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size, t.max_position_embeddings) == \
        (T_WIDTH, T_LAYERS, T_MLP, VOCAB, CTX)
    assert config.projection_dim == EMBED and v.hidden_act == t.hidden_act == "gelu"
    assert t.eos_token_id == VOCAB - 1
    assert (isolated / "HPS_v2_compressed.hf" / "model.safetensors").is_file()


def test_real_vit_h_14_shapes_give_the_published_config():
    """HPSv2's real open_clip ViT-H-14 layout (meta tensors, no memory) converts to exactly CLIPModel's keys."""
    from transformers import CLIPModel

    from comfy_rft.rewards.clip_rewards import convert_open_clip_state_dict

    def m(*shape):
        return torch.empty(*shape, device="meta")

    sd = {"positional_embedding": m(77, 1024), "text_projection": m(1024, 1024), "logit_scale": m(()),
          "visual.class_embedding": m(1280), "visual.positional_embedding": m(257, 1280),
          "visual.proj": m(1280, 1024), "visual.conv1.weight": m(1280, 3, 14, 14),
          "token_embedding.weight": m(49408, 1024)}
    for prefix, width in (("visual.ln_pre", 1280), ("visual.ln_post", 1280), ("ln_final", 1024)):
        sd[prefix + ".weight"], sd[prefix + ".bias"] = m(width), m(width)
    for tower, width, layers in (("visual.", 1280, 32), ("", 1024, 24)):
        for i in range(layers):
            p = f"{tower}transformer.resblocks.{i}."
            for name, shape in (("ln_1.weight", (width,)), ("ln_1.bias", (width,)), ("ln_2.weight", (width,)),
                                ("ln_2.bias", (width,)), ("attn.in_proj_weight", (3 * width, width)),
                                ("attn.in_proj_bias", (3 * width,)), ("attn.out_proj.weight", (width, width)),
                                ("attn.out_proj.bias", (width,)), ("mlp.c_fc.weight", (4 * width, width)),
                                ("mlp.c_fc.bias", (4 * width,)), ("mlp.c_proj.weight", (width, 4 * width)),
                                ("mlp.c_proj.bias", (width,))):
                sd[p + name] = m(*shape)
    tensors, config = convert_open_clip_state_dict(sd)
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size,
            v.image_size) == (1280, 5120, 32, 16, 14, 224)
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size,
            t.max_position_embeddings, t.eos_token_id) == (1024, 4096, 24, 16, 49408, 77, 49407)
    assert config.projection_dim == 1024 and v.hidden_act == t.hidden_act == "gelu"
    assert v.layer_norm_eps == t.layer_norm_eps == 1e-5
    with torch.device("meta"):
        expected = {k: tuple(p.shape) for k, p in CLIPModel(config).state_dict().items()}
    assert {k: tuple(p.shape) for k, p in tensors.items()} == expected


def test_hpsv2_conversion_cached_once_and_reused(files, tmp_path, capsys, monkeypatch):
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    ckpt = ckpt_dir / "HPS_v2.1_compressed.pt"
    shutil.copy(files["hps"], ckpt)
    spec = f"hpsv2.1(checkpoint={ckpt}, tokenizer={files['tokenizer']}, {HPS_OPTIONS})"
    images = images_for(24, 32)
    first = load_reward(spec)(images, PROMPTS)
    cache = ckpt_dir / "HPS_v2.1_compressed.hf"
    assert {"model.safetensors", "config.json"} <= {p.name for p in cache.iterdir()}
    assert capsys.readouterr().err.count("converting HPS_v2.1_compressed.pt") == 1
    stamp = (cache / "model.safetensors").stat().st_mtime_ns

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the checkpoint was read again")

    monkeypatch.setattr(torch, "load", no_unpickling)
    second = load_reward(spec)(images, PROMPTS)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert "converting" not in capsys.readouterr().err
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp
    # other head counts make another model: the cache is redone, not reused wrongly
    monkeypatch.undo()
    load_reward(f"hpsv2.1(checkpoint={ckpt}, tokenizer={files['tokenizer']}, text_heads=2, vision_heads=4)")
    assert capsys.readouterr().err.count("converting") == 1


def test_hpsv2_conversion_goes_to_user_cache_when_folder_unwritable(files, tmp_path, capsys, monkeypatch):
    from comfy_rft.rewards import clip_rewards

    ckpt_dir = tmp_path / "readonly"
    ckpt_dir.mkdir()
    ckpt = ckpt_dir / "HPS_v2.1_compressed.pt"
    shutil.copy(files["hps"], ckpt)
    monkeypatch.setattr(clip_rewards, "_writable_dir", lambda folder: folder != ckpt_dir)
    load_reward(f"hpsv2.1(checkpoint={ckpt}, tokenizer={files['tokenizer']}, {HPS_OPTIONS})")
    assert not (ckpt_dir / "HPS_v2.1_compressed.hf").exists()
    converted = list((tmp_path / "user-cache" / "converted").glob("HPS_v2.1_compressed-*.hf"))
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    assert capsys.readouterr().err.count("converting") == 1


def test_hpsv2_found_in_hf_cache_converts_into_user_cache(files, tmp_path, capsys):
    repo = tmp_path / "hf-cache" / "models--xswu--HPSv2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(files["hps"], repo / "snapshots" / commit / "HPS_v2.1_compressed.pt")
    load_reward(f"hpsv2.1(tokenizer={files['tokenizer']}, {HPS_OPTIONS})")
    assert list((tmp_path / "user-cache" / "converted").glob("HPS_v2.1_compressed-*.hf"))
    assert not list((repo / "snapshots" / commit).glob("*.hf"))
    assert capsys.readouterr().err.count("converting") == 1


def test_hpsv2_full_pickle_falls_back_with_warning(files, tmp_path, caplog):
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": files["hps_state"], "args": argparse.Namespace(lr=1e-5)}, ckpt)
    with caplog.at_level(logging.WARNING):
        reward = load_reward(f"hpsv2.1(checkpoint={ckpt}, tokenizer={files['tokenizer']}, {HPS_OPTIONS})")
    assert "weights_only=True" in caplog.text
    reference = load_reward(f"hpsv2.1(checkpoint={files['hps']}, tokenizer={files['tokenizer']}, {HPS_OPTIONS})")
    images = images_for(24, 32)
    torch.testing.assert_close(reward(images, PROMPTS), reference(images, PROMPTS))


def test_hpsv2_rejects_other_checkpoints(files, tmp_path):
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {**files["hps_state"], "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(40)}},
               ckpt)
    with pytest.raises(UserError, match="ls_1"):
        load_reward(f"hpsv2.1(checkpoint={ckpt}, tokenizer={files['tokenizer']}, {HPS_OPTIONS})")
    with pytest.raises(UserError, match="vision_heads"):
        load_reward(f"hpsv2.1(checkpoint={files['hps']}, tokenizer={files['tokenizer']}, vision_heads=3)")


def _clip_reference(folder, pixels, prompts=PROMPTS):
    image_t, text_t, logit_scale = hf_towers(folder)
    img = normalise(ref_image(pixels, image_t, 4, quick_gelu))
    txt = normalise(ref_text(ref_ids(prompts), text_t, 4, quick_gelu))
    return (img * txt).sum(-1), logit_scale


def test_pickscore_matches_reference(files, isolated):
    reward = load_reward(f"pickscore(model={files['pickscore']}, tokenizer={files['tokenizer']})")
    assert reward.name == "pickscore" and reward.typical_range == (17, 24)
    images = images_for(32, 48)
    cos, logit_scale = _clip_reference(files["pickscore"], crop_pixels(images))
    got = reward(images, PROMPTS)
    torch.testing.assert_close(got, logit_scale.exp() * cos, atol=100 * ATOL, rtol=0)
    assert (got[0] - got[1]).abs() > 1e-2
    check_gradients(reward, images, PROMPTS)
    # defaults: PickScore_v1/ and the laion tokenizer folder from the rewards folder
    shutil.copytree(files["pickscore"], isolated / "PickScore_v1")
    with pytest.raises(UserError, match="CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_reward("pickscore")
    shutil.copytree(files["tokenizer"], isolated / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    torch.testing.assert_close(load_reward("pickscore")(images, PROMPTS), got)


def test_clipscore_matches_reference(files):
    reward = load_reward(f"clipscore(model={files['clip']})")
    assert reward.name == "clipscore" and reward.typical_range == (20, 35)
    images = images_for(32, 48)
    cos, _ = _clip_reference(files["clip"], crop_pixels(images))
    assert (cos > 0).all()
    got = reward(images, PROMPTS)
    torch.testing.assert_close(got, 100 * cos, atol=100 * ATOL, rtol=0)
    check_gradients(reward, images, PROMPTS)
    # max(cos, 0): a pair with a negative cosine scores 0
    prompts = ["a dog", "zzz"]
    cos, _ = _clip_reference(files["clip"], crop_pixels(images), prompts)
    assert cos[0] > 0 > cos[1]
    torch.testing.assert_close(reward(images, prompts), 100 * cos.clamp_min(0), atol=100 * ATOL, rtol=0)


def test_prompts_tokenised_once_and_text_cached(files):
    reward = load_reward(f"clipscore(model={files['clip']})")
    calls = []
    tokenizer = reward.tokenizer

    def counting(*args, **kwargs):
        calls.append(args[0])
        return tokenizer(*args, **kwargs)

    reward.tokenizer = counting
    encode = reward.model.get_text_features
    encoded = []

    def counting_encode(*args, **kwargs):  # the text tower is frozen: its embeddings are cached too
        encoded.append(kwargs["input_ids"].shape[0])
        return encode(*args, **kwargs)

    reward.model.get_text_features = counting_encode
    images = images_for(32, 48)
    first = reward(images, ["same prompt", "same prompt"])
    second = reward(images.flip(0), ["same prompt", "same prompt"])
    assert calls == ["same prompt"] and encoded == [1]
    torch.testing.assert_close(second, first.flip(0))


@pytest.mark.parametrize("spec, names", [
    ("aesthetic", ["clip-vit-large-patch14", "huggingface.co/openai/clip-vit-large-patch14"]),
    ("aesthetic(clip={clip})", ["sac+logos+ava1-l14-linearMSE.pth",
                                "github.com/christophschuhmann/improved-aesthetic-predictor"]),
    ("hpsv2", ["HPS_v2_compressed.pt", "huggingface.co/xswu/HPSv2"]),
    ("hpsv2.1", ["HPS_v2.1_compressed.pt", "huggingface.co/xswu/HPSv2"]),
    ("hpsv2.1(checkpoint={hps})", ["CLIP-ViT-H-14-laion2B-s32B-b79K",
                                   "huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]),
    ("pickscore", ["PickScore_v1", "huggingface.co/yuvalkirstain/PickScore_v1"]),
    ("clipscore", ["clip-vit-large-patch14", "huggingface.co/openai/clip-vit-large-patch14"]),
])
def test_missing_file_names_it_and_where_published(files, isolated, spec, names):
    with pytest.raises(UserError) as err:
        load_reward(spec.format(clip=files["clip"], hps=files["hps"]))
    message = str(err.value)
    for name in names:
        assert name in message
    assert str(isolated) in message  # where to put it


def test_wrong_option_is_a_user_error(files):
    with pytest.raises(UserError, match="unknown option"):
        load_reward(f"clipscore(model={files['clip']}, head=x)")
    with pytest.raises(UserError, match="version=2.0 or version=2.1"):
        load_reward("hpsv2(version=3)")
