"""Engine helpers the ComfyUI adapter relies on: LDM -> diffusers LoRA names, a schedule from ᾱ_t."""

from __future__ import annotations

import pytest
import torch

from comfy_rft import lora
from comfy_rft.errors import UserError


def _unets():
    from diffusers import UNet2DConditionModel

    from comfy_rft.tiny import _build_random

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8)
        small = UNet2DConditionModel(block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=768,
                                     down_block_types=("CrossAttnDownBlock2D",) * 2,
                                     up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=8)
    return {"sd15": sd15, "sd15-two-levels": small, "tiny-sd15": _build_random("tiny-sd15", 0, "epsilon").unet,
            "tiny-sdxl": _build_random("tiny-sdxl", 0, "epsilon").unet}


@pytest.mark.parametrize("name", ["sd15", "sd15-two-levels", "tiny-sd15", "tiny-sdxl"])
def test_ldm_names_map_back_to_every_diffusers_layer(name):
    """`ldm_unet_path_to_diffusers` inverts the export's diffusers -> LDM map on every LoRA-able layer."""
    unet = _unets()[name]
    checked = 0
    for path in lora._adaptable_layers(unet):
        ldm = lora._sgm_path(path, unet.config)
        if ldm is None:
            continue
        assert lora.ldm_unet_path_to_diffusers(ldm, unet.config.layers_per_block) == path, ldm
        checked += 1
    assert checked > 100


def test_unknown_ldm_layers_have_no_diffusers_name():
    assert lora.ldm_unet_path_to_diffusers("label_emb.0.0", 2) == "add_embedding.linear_1"
    assert lora.ldm_unet_path_to_diffusers("input_blocks.3.0.op", 2) == "down_blocks.0.downsamplers.0.conv"
    assert lora.ldm_unet_path_to_diffusers("output_blocks.2.1.conv", 2) == "up_blocks.0.upsamplers.0.conv"
    assert lora.ldm_unet_path_to_diffusers("output_blocks.5.2.conv", 2) == "up_blocks.1.upsamplers.0.conv"
    for bad in ("middle_block.7.foo", "input_blocks.x.1", "nonsense", "input_blocks.3.0.conv"):
        assert lora.ldm_unet_path_to_diffusers(bad, 2) is None
    with pytest.raises(UserError, match="no diffusers name"):
        lora.ldm_to_diffusers_lora_names(["nonsense.layer"], 2)


def test_a_lora_trained_under_ldm_names_loads_in_diffusers_after_renaming(tmp_path):
    """What the trainer node does for SD1.x: a LoRA whose layers carry ComfyUI's LDM names is written with
    diffusers block names, and diffusers' own loader takes it with no missing or unexpected keys."""
    from comfy_rft.backend import DiffusersBackend
    from lora_checks import assert_no_key_problems, captured_messages

    backend = DiffusersBackend.load("tiny-sd15", device="cpu")
    unet = backend.denoiser
    lora.inject_lora(unet, 4, 4.0, init=False)  # non-zero A and B
    diffusers_state = lora.lora_state_dict(unet)
    layer_paths = [p for p, _ in lora._lora_layers(unet, "default")]
    ldm_paths = [lora._sgm_path(p, unet.config) for p in layer_paths]
    to_ldm = {lora.kohya_module_name("lora_unet", p): lora.kohya_module_name("lora_unet", m)
              for p, m in zip(layer_paths, ldm_paths)}
    ldm_state = lora.rename_lora_modules(diffusers_state, to_ldm)  # as lora_state_dict writes it in ComfyUI
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in ldm_state)

    renamed = lora.rename_lora_modules(ldm_state, lora.ldm_to_diffusers_lora_names(ldm_paths, 2))
    assert renamed.keys() == diffusers_state.keys()
    assert all(torch.equal(renamed[k], diffusers_state[k]) for k in renamed)

    path = lora.save_lora(tmp_path / "renamed.safetensors", renamed, None)
    fresh = DiffusersBackend.load("tiny-sd15", device="cpu")
    with captured_messages() as messages:
        fresh.pipe.load_lora_weights(str(path), adapter_name="renamed")
    assert_no_key_problems(messages)
    loaded = sum(1 for _, m in fresh.pipe.unet.named_modules() if hasattr(m, "lora_A") and "renamed" in m.lora_A)
    assert loaded == len(layer_paths)


def _ldm_named(unet):
    """A stand-in for ComfyUI's LDM-named UNet: copies of the diffusers UNet's LoRA-able layers at their LDM paths."""
    import copy

    root = torch.nn.Module()
    root.num_res_blocks = [unet.config.layers_per_block] * len(unet.config.block_out_channels)
    for path in lora._adaptable_layers(unet):
        *parents, leaf = lora._sgm_path(path, unet.config).split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, torch.nn.Module())
            node = getattr(node, name)
        node.add_module(leaf, copy.deepcopy(unet.get_submodule(path)))
    return root


def test_a_diffusers_named_lora_loads_into_an_ldm_named_unet(tmp_path):
    """The published LCM-LoRAs carry diffusers names; ComfyUI's UNet has LDM names: they still match."""
    from comfy_rft.backend import DiffusersBackend

    unet = DiffusersBackend.load("tiny-sd15", device="cpu").denoiser
    ldm = _ldm_named(unet)
    lora.inject_lora(unet, 4, 4.0, ("to_q", "proj_in", "conv1", "time_emb_proj"), init=False)
    state = lora.lora_state_dict(unet)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in state)  # diffusers names
    lora.load_lora(ldm, lora.save_lora(tmp_path / "lcm.safetensors", state, None))
    layers = lora._lora_layers(ldm, "default")
    assert len(layers) == len(lora._lora_layers(unet, "default"))
    for path, layer in layers:
        name = lora.kohya_module_name("lora_unet", lora.ldm_unet_path_to_diffusers(path, 2))
        assert torch.equal(layer.lora_A["default"].weight, state[f"{name}.lora_down.weight"])
        assert torch.equal(layer.lora_B["default"].weight, state[f"{name}.lora_up.weight"])


def test_schedule_from_alphas_cumprod_matches_the_sd_scheduler():
    from comfy_rft.schedule import DDIMSchedule, schedule_from_alphas_cumprod
    from comfy_rft.tiny import _scheduler

    for prediction in ("epsilon", "v_prediction"):
        reference = DDIMSchedule(_scheduler(prediction).config)
        sigmas = ((1 - reference.alphas_cumprod) / reference.alphas_cumprod).sqrt().float()  # as ComfyUI stores them
        built = schedule_from_alphas_cumprod(1 / (1 + sigmas.double() ** 2), prediction)
        assert built.prediction_type == prediction
        assert torch.allclose(built.alphas_cumprod, reference.alphas_cumprod, rtol=1e-5)
        assert built.timesteps(50) == reference.timesteps(50)
        assert built.final_alpha_cumprod == pytest.approx(reference.final_alpha_cumprod, rel=1e-5)
    with pytest.raises(ValueError):
        schedule_from_alphas_cumprod([0.5])
