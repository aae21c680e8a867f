"""LoRA files: bit-exact round trip, the kohya file contract, diffusers compatibility, strength and mixing."""

import json

import pytest
import torch
from lora_checks import assert_no_key_problems, captured_messages
from safetensors.torch import save_file

from comfy_rft.errors import UserError
from comfy_rft.lora import (
    inject_lora,
    load_lora,
    lora_architecture,
    lora_metadata,
    lora_state_dict,
    mix_loras,
    read_lora,
    save_lora,
    set_lora_strength,
)
from comfy_rft.tiny import build_tiny_pipeline

torch.set_num_threads(1)

RANK, ALPHA = 4, 8  # alpha != rank, so a file storing the rank as alpha would load at the wrong scale
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# Every Linear/Conv layer kind of the UNet: exercises the whole diffusers -> sgm mapping on SDXL.
ALL_UNET_TARGETS = (
    "conv_in", "linear_1", "linear_2", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv",
    "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv_out",
)


def unet_inputs(unet):
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500, 20]),
        "encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    return inputs


@torch.no_grad()
def unet_out(unet):
    return unet(**unet_inputs(unet)).sample


def trained(module, seed=1, targets=None, std=0.05):
    """Inject an adapter and give it random non-zero weights, as if trained."""
    torch.manual_seed(seed)
    params = inject_lora(module, RANK, ALPHA, **({"target_modules": targets} if targets else {}))
    with torch.no_grad():
        for p in params:
            p.normal_(0, std)
    return params


def metadata_for(unet):
    return lora_metadata(
        base_model="tiny", architecture=lora_architecture(unet), method="draft", reward="aesthetic",
        config={"lr": 1e-4, "steps": 10}, rank=RANK, alpha=ALPHA, resolution=64, prediction_type="epsilon",
        title="test lora",
    )


def lora_paths(module):
    from peft.tuners.lora import LoraLayer

    return {name for name, m in module.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_round_trip_is_bit_exact(name, tmp_path):
    pipe = build_tiny_pipeline(name, fit=False)
    base = unet_out(pipe.unet)
    trained(pipe.unet)
    expected = unet_out(pipe.unet)
    assert not torch.allclose(expected, base, atol=1e-3), "the adapter must change the output"
    state = lora_state_dict(pipe.unet)
    path = save_lora(tmp_path / "sub" / "lora.safetensors", state, metadata_for(pipe.unet))

    fresh = build_tiny_pipeline(name, fit=False)
    loaded_state, metadata = read_lora(path)
    params = load_lora(fresh.unet, path)
    again = lora_state_dict(fresh.unet)

    assert again.keys() == state.keys() == loaded_state.keys()
    for key in state:
        assert again[key].dtype == state[key].dtype and torch.equal(again[key], state[key]), key
    assert torch.equal(unet_out(fresh.unet), expected)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in params)
    assert metadata["modelspec.architecture"] == lora_architecture(pipe.unet)
    assert json.loads(metadata["comfy_rft.config"]) == {"lr": 1e-4, "steps": 10}


def test_metadata_fields():
    sd15, sdxl = build_tiny_pipeline("tiny-sd15", fit=False), build_tiny_pipeline("tiny-sdxl", fit=False)
    assert lora_architecture(sd15.unet) == "stable-diffusion-v1/lora"
    assert lora_architecture(sdxl.unet) == "stable-diffusion-xl-v1-base/lora"
    meta = lora_metadata(
        base_model="sdxl", architecture=lora_architecture(sdxl.unet), method="draft", reward="hps",
        config={"k": [1, 2]}, rank=4, alpha=8, resolution=(1024, 768), prediction_type="v_prediction", title="t",
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.resolution"] == "1024x768"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_network_alpha"] == "8" and meta["ss_network_dim"] == "4"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["comfy_rft.method"] == "draft" and meta["comfy_rft.reward"] == "hps"


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_file_layout(name):
    pipe = build_tiny_pipeline(name, fit=False)
    trained(pipe.unet)
    trained(pipe.text_encoder, targets=CLIP_TARGETS)
    state = lora_state_dict(pipe.unet, {"lora_te1" if name == "tiny-sdxl" else "lora_te": pipe.text_encoder})

    modules = {key.split(".")[0] for key in state}
    assert len(modules) == len(lora_paths(pipe.unet)) + len(lora_paths(pipe.text_encoder))
    assert len(state) == 3 * len(modules)
    for module in modules:
        assert module.startswith(("lora_unet_", "lora_te_", "lora_te1_")), module
        down, up = state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == RANK
        alpha = state[f"{module}.alpha"]
        assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == ALPHA
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    if name == "tiny-sd15":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_modules
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in unet_modules
        assert not any("input_blocks" in m or "output_blocks" in m for m in unet_modules)
    else:
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet_modules
        assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0" in unet_modules
        assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_v" in unet_modules
        assert not any(b in m for m in unet_modules for b in ("down_blocks", "mid_block", "up_blocks"))


def test_sdxl_names_follow_the_ldm_checkpoint_layout():
    """Names diffusers' loader tolerates but ComfyUI would not (it matches exact LDM paths)."""
    pipe = build_tiny_pipeline("tiny-sdxl", fit=False)
    trained(pipe.unet, targets=ALL_UNET_TARGETS)
    modules = {key.split(".")[0].removeprefix("lora_unet_") for key in lora_state_dict(pipe.unet)}
    assert len(modules) == len(lora_paths(pipe.unet))
    assert {
        "input_blocks_0_0", "time_embed_0", "time_embed_2", "label_emb_0_0", "label_emb_0_2", "out_2",
        "input_blocks_1_0_in_layers_2", "input_blocks_1_0_emb_layers_1", "input_blocks_2_0_out_layers_3",
        "input_blocks_3_0_op", "input_blocks_4_0_skip_connection", "input_blocks_8_1_proj_in",
        "middle_block_0_in_layers_2", "middle_block_1_transformer_blocks_1_ff_net_2", "middle_block_2_out_layers_3",
        "output_blocks_0_0_skip_connection", "output_blocks_2_2_conv", "output_blocks_5_2_conv",
        "output_blocks_8_0_emb_layers_1",
    } <= modules


def test_sd15_file_with_ldm_names_loads():
    """A LoRA trained inside ComfyUI names SD1.5 layers the LDM way; it loads and re-exports with diffusers names."""
    unet = build_tiny_pipeline("tiny-sd15", fit=False).unet
    ldm_to_diffusers = {
        "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_5_0_emb_layers_1": "down_blocks.1.resnets.1.time_emb_proj",
        "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_8_2_conv": "up_blocks.2.upsamplers.0.conv",
    }
    g = torch.Generator().manual_seed(0)
    state, expected = {}, {}
    for ldm, path in ldm_to_diffusers.items():
        weight = unet.get_submodule(path).weight
        down = torch.randn(RANK, *weight.shape[1:], generator=g)
        up = torch.randn(weight.shape[0], RANK, *[1] * (weight.dim() - 2), generator=g)
        state |= {f"lora_unet_{ldm}.lora_down.weight": down, f"lora_unet_{ldm}.lora_up.weight": up}
        key = "lora_unet_" + path.replace(".", "_")
        expected |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        expected[f"{key}.alpha"] = state[f"lora_unet_{ldm}.alpha"] = torch.tensor(float(ALPHA))
    load_lora(unet, state)
    again = lora_state_dict(unet)
    assert again.keys() == expected.keys() and all(torch.equal(again[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "name,targets",
    [("tiny-sd15", None), ("tiny-sdxl", None), ("tiny-sdxl", ALL_UNET_TARGETS)],
    ids=["sd15", "sdxl", "sdxl-all-layers"],
)
def test_diffusers_loads_the_export(name, targets, tmp_path):
    pipe = build_tiny_pipeline(name, fit=False)
    trained(pipe.unet, targets=targets)
    expected = unet_out(pipe.unet)
    path = save_lora(tmp_path / "lora.safetensors", lora_state_dict(pipe.unet), metadata_for(pipe.unet))

    fresh = build_tiny_pipeline(name, fit=False)
    with captured_messages() as messages:
        fresh.load_lora_weights(str(path))
    assert_no_key_problems(messages)
    assert lora_paths(fresh.unet) == lora_paths(pipe.unet)
    torch.testing.assert_close(unet_out(fresh.unet), expected, rtol=0, atol=1e-4)


def test_text_encoder_keys_and_diffusers_load(tmp_path):
    pipe = build_tiny_pipeline("tiny-sd15", fit=False)
    ids = pipe.tokenizer(["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
    trained(pipe.unet)
    trained(pipe.text_encoder, seed=2, targets=CLIP_TARGETS, std=0.2)
    with torch.no_grad():
        expected = pipe.text_encoder(ids)[0]
    assert not torch.allclose(expected, base, atol=1e-3)
    state = lora_state_dict(pipe.unet, {"lora_te": pipe.text_encoder})
    te_modules = {k.split(".")[0] for k in state if not k.startswith("lora_unet_")}
    assert te_modules and all(m.startswith("lora_te_text_model_encoder_layers_") for m in te_modules)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in te_modules
    path = save_lora(tmp_path / "lora.safetensors", state, None)

    fresh = build_tiny_pipeline("tiny-sd15", fit=False)
    with captured_messages() as messages:
        fresh.load_lora_weights(str(path))
    assert_no_key_problems(messages)
    assert lora_paths(fresh.text_encoder) == lora_paths(pipe.text_encoder)
    with torch.no_grad():
        torch.testing.assert_close(fresh.text_encoder(ids)[0], expected, rtol=0, atol=1e-4)

    ours = build_tiny_pipeline("tiny-sd15", fit=False)
    load_lora(ours.unet, path, {"lora_te": ours.text_encoder})
    again = lora_state_dict(ours.unet, {"lora_te": ours.text_encoder})
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_per_layer_rank_and_alpha_round_trip():
    """Files from other trainers may vary rank/alpha per layer; each layer must keep its own."""
    pipe = build_tiny_pipeline("tiny-sd15", fit=False)
    trained(pipe.unet)
    state = lora_state_dict(pipe.unet)
    odd = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k"
    state[f"{odd}.lora_down.weight"] = state[f"{odd}.lora_down.weight"][:2].clone()
    state[f"{odd}.lora_up.weight"] = state[f"{odd}.lora_up.weight"][:, :2].clone()
    state[f"{odd}.alpha"] = torch.tensor(3.0)
    unet = build_tiny_pipeline("tiny-sd15", fit=False).unet
    load_lora(unet, state)
    again = lora_state_dict(unet)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_unet_only_load_ignores_text_encoder_keys(tmp_path):
    pipe = build_tiny_pipeline("tiny-sd15", fit=False)
    trained(pipe.unet)
    trained(pipe.text_encoder, targets=CLIP_TARGETS)
    path = save_lora(tmp_path / "lora.safetensors", lora_state_dict(pipe.unet, {"lora_te": pipe.text_encoder}), None)
    fresh = build_tiny_pipeline("tiny-sd15", fit=False)
    load_lora(fresh.unet, path)
    assert not lora_paths(fresh.text_encoder)
    assert torch.equal(unet_out(fresh.unet), unet_out(pipe.unet))


def test_sdxl_file_with_diffusers_names_loads(tmp_path):
    """Third-party SDXL LoRAs often use diffusers block names; they must land on the same layers."""
    pipe = build_tiny_pipeline("tiny-sdxl", fit=False)
    trained(pipe.unet)
    state = lora_state_dict(pipe.unet)
    renamed = {}
    for path in sorted(lora_paths(pipe.unet)):
        layer = pipe.unet.get_submodule(path)
        key = "lora_unet_" + path.replace(".", "_")
        renamed[f"{key}.lora_down.weight"] = layer.lora_A["default"].weight.detach().clone()
        renamed[f"{key}.lora_up.weight"] = layer.lora_B["default"].weight.detach().clone()
        renamed[f"{key}.alpha"] = torch.tensor(float(ALPHA))
    fresh = build_tiny_pipeline("tiny-sdxl", fit=False)
    load_lora(fresh.unet, renamed)
    again = lora_state_dict(fresh.unet)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_strength_scales_the_adapter(tmp_path):
    pipe = build_tiny_pipeline("tiny-sd15", fit=False)
    base = unet_out(pipe.unet)
    trained(pipe.unet)
    full = unet_out(pipe.unet)
    path = save_lora(tmp_path / "lora.safetensors", lora_state_dict(pipe.unet), None)

    fresh = build_tiny_pipeline("tiny-sd15", fit=False)
    load_lora(fresh.unet, path, strength=0.0)
    torch.testing.assert_close(unet_out(fresh.unet), base, rtol=0, atol=1e-6)
    set_lora_strength(fresh.unet, 0.5)
    half = unet_out(fresh.unet)
    span = (full - base).norm()
    assert 0.1 * span < (half - base).norm() < span and 0.1 * span < (full - half).norm() < span
    set_lora_strength(fresh.unet, 1.0)
    torch.testing.assert_close(unet_out(fresh.unet), full, rtol=0, atol=1e-6)


def test_mix_with_weights_one_and_zero_equals_the_first(tmp_path):
    outputs, paths = [], []
    for seed in (1, 2):
        pipe = build_tiny_pipeline("tiny-sd15", fit=False)
        trained(pipe.unet, seed=seed)
        outputs.append(unet_out(pipe.unet))
        paths.append(save_lora(tmp_path / f"lora{seed}.safetensors", lora_state_dict(pipe.unet), None))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)

    for weights, expected in (((1.0, 0.0), outputs[0]), ((0.0, 1.0), outputs[1])):
        fresh = build_tiny_pipeline("tiny-sd15", fit=False)
        names = mix_loras(fresh.unet, list(zip(paths, weights)))
        assert len(names) == 2
        assert not any(p.requires_grad for p in fresh.unet.parameters()), "a mix is for inference"
        torch.testing.assert_close(unet_out(fresh.unet), expected, rtol=0, atol=1e-6)


def test_bad_lora_settings():
    unet = build_tiny_pipeline("tiny-sd15", fit=False).unet
    with pytest.raises(UserError, match="rank"):
        inject_lora(unet, 0, 8)
    with pytest.raises(UserError, match="alpha"):
        inject_lora(unet, 4, 0)
    with pytest.raises(UserError, match="no_such_layer"):
        inject_lora(unet, 4, 4, target_modules=("no_such_layer",))
    inject_lora(unet, 4, 4)
    with pytest.raises(UserError, match="adapter_name"):
        inject_lora(unet, 4, 4)


def test_read_lora_rejects_non_lora_files(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(UserError, match="missing.safetensors"):
        read_lora(missing)
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my training notes, not a LoRA")
    with pytest.raises(UserError, match="notes.safetensors"):
        read_lora(text)
    other = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.randn(3, 3), "model.bias": torch.randn(3)}, str(other))
    with pytest.raises(UserError, match="other.safetensors.*lora_unet_"):
        read_lora(other)


def test_load_lora_for_another_architecture_names_unmatched_keys(tmp_path):
    pipe = build_tiny_pipeline("tiny-sd15", fit=False)
    trained(pipe.unet)
    path = save_lora(tmp_path / "sd15.safetensors", lora_state_dict(pipe.unet), None)
    sdxl = build_tiny_pipeline("tiny-sdxl", fit=False).unet
    with pytest.raises(UserError, match="lora_unet_down_blocks_0_attentions"):
        load_lora(sdxl, path)
    # Keys that name SDXL layers too, but with SD1.5 widths: refused before anything is injected.
    shared = {k: v for k, v in read_lora(path)[0].items() if k.startswith("lora_unet_down_blocks_1_")}
    with pytest.raises(UserError, match="shape"):
        load_lora(sdxl, shared)
    assert not lora_paths(sdxl)
