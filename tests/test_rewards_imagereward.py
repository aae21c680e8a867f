"""ImageReward: tiny random weights in the upstream checkpoint format, scored against a hand-written forward."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from comfy_rft.errors import UserError
from comfy_rft.rewards import BUILTINS, load_reward

torch.set_num_threads(1)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "##s", "the", "red", "car"]
VIT_WIDTH, VIT_DEPTH, PATCH, IMAGE = 128, 2, 16, 32  # width/64 = 2 heads, as ViT-L/16: 1024/64 = 16
BERT = {"hidden": 32, "layers": 2, "heads": 4, "inner": 64, "positions": 40}
HEAD = [BERT["hidden"], 24, 16, 8, 4, 1]  # upstream: 768 → 1024 → 128 → 64 → 16 → 1
MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def tiny_state_dict(seed=0):
    """Random weights under ImageReward.pt's key names (incl. the entries upstream leaves unused)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {}

    def linear(name, fan_in, fan_out):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(fan_out, fan_in, scale=fan_in ** -0.5), rnd(fan_out, scale=0.05)

    def norm(name, width):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + rnd(width, scale=0.1), rnd(width, scale=0.1)

    v, w, h = "blip.visual_encoder", VIT_WIDTH, BERT["hidden"]
    sd[f"{v}.cls_token"] = rnd(1, 1, w)
    sd[f"{v}.pos_embed"] = rnd(1, (IMAGE // PATCH) ** 2 + 1, w)
    sd[f"{v}.patch_embed.proj.weight"] = rnd(w, 3, PATCH, PATCH, scale=0.05)
    sd[f"{v}.patch_embed.proj.bias"] = rnd(w, scale=0.05)
    for i in range(VIT_DEPTH):
        b = f"{v}.blocks.{i}"
        norm(f"{b}.norm1", w)
        linear(f"{b}.attn.qkv", w, 3 * w)
        linear(f"{b}.attn.proj", w, w)
        norm(f"{b}.norm2", w)
        linear(f"{b}.mlp.fc1", w, 4 * w)
        linear(f"{b}.mlp.fc2", 4 * w, w)
    norm(f"{v}.norm", w)
    t = "blip.text_encoder"
    sd[f"{t}.embeddings.word_embeddings.weight"] = rnd(len(VOCAB) + 2, h, scale=1.0)
    sd[f"{t}.embeddings.position_embeddings.weight"] = rnd(BERT["positions"], h, scale=0.5)
    sd[f"{t}.embeddings.position_ids"] = torch.arange(BERT["positions"]).expand(1, -1)  # persistent buffer upstream
    norm(f"{t}.embeddings.LayerNorm", h)
    for i in range(BERT["layers"]):
        layer = f"{t}.encoder.layer.{i}"
        for part, context in (("attention", h), ("crossattention", w)):
            linear(f"{layer}.{part}.self.query", h, h)
            linear(f"{layer}.{part}.self.key", context, h)
            linear(f"{layer}.{part}.self.value", context, h)
            linear(f"{layer}.{part}.output.dense", h, h)
            norm(f"{layer}.{part}.output.LayerNorm", h)
        linear(f"{layer}.intermediate.dense", h, BERT["inner"])
        linear(f"{layer}.output.dense", BERT["inner"], h)
        norm(f"{layer}.output.LayerNorm", h)
    linear("blip.vision_proj", w, 16)  # BLIP's contrastive projections: in the file, unused by the score
    linear("blip.text_proj", h, 16)
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), itertools.pairwise(HEAD)):
        linear(f"mlp.layers.{index}", fan_in, fan_out)
    return sd


def write_files(folder, sd=None):
    folder.mkdir(parents=True, exist_ok=True)
    sd = tiny_state_dict() if sd is None else sd
    torch.save(sd, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps({  # upstream's field names, tiny sizes
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": BERT["hidden"], "initializer_range": 0.02,
        "intermediate_size": BERT["inner"], "layer_norm_eps": 1e-12, "max_position_embeddings": BERT["positions"],
        "model_type": "bert", "num_attention_heads": BERT["heads"], "num_hidden_layers": BERT["layers"],
        "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2, "encoder_width": BERT["hidden"],
        "add_cross_attention": True}))
    (folder / "bert-base-uncased").mkdir(exist_ok=True)
    (folder / "bert-base-uncased" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return sd


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No ComfyUI folders, no user HF cache: only the files a test writes are found."""
    import huggingface_hub.constants

    for var in ("COMFYUI_DIR", "COMFYUI_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("COMFY_RFT_REWARDS_DIR", str(empty))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def spec(folder, **extra):
    options = {"checkpoint": folder / "ImageReward.pt", "med_config": folder / "med_config.json",
               "bert": folder / "bert-base-uncased", **extra}
    return "imagereward(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"


# ---------------------------------------------------------------- the reference forward, from raw tensors

def lin(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def ln(sd, name, x, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def attend(q, k, v, heads, bias=None):
    b, lq, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, lq, c)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def preprocess(images):
    """Shortest side → 32 (bicubic, antialiased), centre crop, OpenAI-CLIP mean/std."""
    h, w = images.shape[-2:]
    s = IMAGE / min(h, w)
    nh, nw = round(h * s), round(w * s)
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - IMAGE) // 2, (nw - IMAGE) // 2
    x = x[..., top:top + IMAGE, left:left + IMAGE]
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def reference_score(sd, images, ids, mask):
    x = preprocess(images)
    v = "blip.visual_encoder"
    x = F.conv2d(x, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[f"{v}.pos_embed"]
    for i in range(VIT_DEPTH):  # pre-LN blocks, fused qkv
        b = f"{v}.blocks.{i}"
        q, k, val = lin(sd, f"{b}.attn.qkv", ln(sd, f"{b}.norm1", x, 1e-6)).chunk(3, dim=-1)
        x = x + lin(sd, f"{b}.attn.proj", attend(q, k, val, VIT_WIDTH // 64))
        x = x + lin(sd, f"{b}.mlp.fc2", gelu(lin(sd, f"{b}.mlp.fc1", ln(sd, f"{b}.norm2", x, 1e-6))))
    image = ln(sd, f"{v}.norm", x, 1e-6)

    t, eps, heads = "blip.text_encoder", 1e-12, BERT["heads"]
    y = sd[f"{t}.embeddings.word_embeddings.weight"][ids] + sd[f"{t}.embeddings.position_embeddings.weight"][:ids.shape[1]]
    y = ln(sd, f"{t}.embeddings.LayerNorm", y, eps)
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(BERT["layers"]):  # post-LN: self-attention, cross-attention to the image, feed-forward
        layer = f"{t}.encoder.layer.{i}"
        for part, context, part_bias in (("attention", None, bias), ("crossattention", image, None)):
            context = y if context is None else context
            s = f"{layer}.{part}.self"
            a = attend(lin(sd, f"{s}.query", y), lin(sd, f"{s}.key", context), lin(sd, f"{s}.value", context),
                       heads, part_bias)
            y = ln(sd, f"{layer}.{part}.output.LayerNorm", lin(sd, f"{layer}.{part}.output.dense", a) + y, eps)
        inner = gelu(lin(sd, f"{layer}.intermediate.dense", y))
        y = ln(sd, f"{layer}.output.LayerNorm", lin(sd, f"{layer}.output.dense", inner) + y, eps)
    z = y[:, 0]
    for index in (0, 2, 4, 6, 7):  # no activations
        z = lin(sd, f"mlp.layers.{index}", z)
    return (z.squeeze(-1) - MEAN) / STD


def token_ids(words):
    """[CLS] words [SEP] [PAD]… up to 35, by hand from VOCAB (upstream keeps [CLS] first, no [ENC])."""
    ids = [2] + [VOCAB.index(w) if w in VOCAB else 1 for w in words][:33] + [3]
    return ids + [0] * (35 - len(ids)), [1] * len(ids) + [0] * (35 - len(ids))


# ---------------------------------------------------------------- tests

def test_registered():
    assert "imagereward" in BUILTINS
    files = BUILTINS["imagereward"].files
    assert "ImageReward.pt" in files and "med_config.json" in files and "vocab.txt" in files
    assert "THUDM/ImageReward" in files and "bert-base-uncased" in files


def test_score_matches_reference_forward(tmp_path):
    sd = write_files(tmp_path / "ir")
    reward = load_reward(spec(tmp_path / "ir"))
    assert reward.name == "imagereward" and reward.differentiable and reward.typical_range == (-2.0, 2.0)
    assert not reward.training and all(not p.requires_grad for p in reward.parameters())
    assert all(p.dtype == torch.float32 for p in reward.parameters())

    prompts = ["A photo of cats", "the RED dog car", " ".join(["cat"] * 50)]
    expected_tokens = [token_ids(["a", "photo", "of", "cat", "##s"]), token_ids(["the", "red", "dog", "car"]),
                       token_ids(["cat"] * 50)]
    ids, mask = reward.tokens(prompts)
    assert ids.tolist() == [e[0] for e in expected_tokens]
    assert mask.tolist() == [e[1] for e in expected_tokens]

    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    scores = reward(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    expected = reference_score(sd, images, ids, mask)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # the prompts and images make a difference
    # same prompt again comes from the cache and scores the same
    torch.testing.assert_close(reward(images[:1], prompts[:1]), expected[:1], atol=1e-5, rtol=1e-5)


def test_gradient_reaches_pixels(tmp_path):
    write_files(tmp_path / "ir")
    reward = load_reward(spec(tmp_path / "ir"))
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
    reward(images, ["a photo of cats", "the red car"]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


def test_found_in_rewards_dir(tmp_path, monkeypatch):
    write_files(tmp_path / "rewards")
    monkeypatch.setenv("COMFY_RFT_REWARDS_DIR", str(tmp_path / "rewards"))
    scores = load_reward("imagereward")(torch.rand(1, 3, 32, 32), ["a cat"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("missing, where", [("ImageReward.pt", "THUDM/ImageReward"),
                                            ("med_config.json", "THUDM/ImageReward"),
                                            ("bert-base-uncased", "google-bert/bert-base-uncased")])
def test_missing_file_names_it_and_where_it_is_published(tmp_path, monkeypatch, missing, where):
    folder = tmp_path / "rewards"
    write_files(folder)
    target = folder / missing
    if target.is_dir():
        (target / "vocab.txt").unlink()
        target.rmdir()
    else:
        target.unlink()
    monkeypatch.setenv("COMFY_RFT_REWARDS_DIR", str(folder))
    with pytest.raises(UserError) as err:
        load_reward("imagereward")
    assert missing in str(err.value) and where in str(err.value)


def test_explicit_path_that_does_not_exist(tmp_path):
    write_files(tmp_path / "ir")
    with pytest.raises(UserError, match="checkpoint="):
        load_reward(spec(tmp_path / "ir").replace("ImageReward.pt", "nope.pt"))


def _edit(sd, change):
    sd = dict(sd)
    change(sd)
    return sd


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.__setitem__("text_decoder.bert.foo.weight", torch.zeros(2)), "text_decoder.bert.foo.weight"),
    (lambda sd: sd.__setitem__("blip.text_encoder.encoder.layer.0.extra.weight", torch.zeros(2)),
     "blip.text_encoder.encoder.layer.0.extra.weight"),
    (lambda sd: sd.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"),
     "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"),
    (lambda sd: sd.__setitem__("blip.text_encoder.encoder.layer.0.attention.self.query.weight", torch.zeros(8, 8)),
     "attention.self.query.weight"),
])
def test_wrong_checkpoint_is_a_clear_error(tmp_path, change, message):
    write_files(tmp_path / "ir", _edit(tiny_state_dict(), change))
    with pytest.raises(UserError, match="ImageReward.pt") as err:
        load_reward(spec(tmp_path / "ir"))
    assert message in str(err.value)


def test_vocab_larger_than_config_is_an_error(tmp_path):
    write_files(tmp_path / "ir")
    (tmp_path / "ir" / "bert-base-uncased" / "vocab.txt").write_text("\n".join(VOCAB + ["dog", "sky"]) + "\n")
    with pytest.raises(UserError, match="vocab_size"):
        load_reward(spec(tmp_path / "ir"))
