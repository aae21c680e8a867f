"""The interfaces of the stock ComfyUI nodes our shipped workflows use, as `/object_info` shows them.

Tests check workflows against this table without ComfyUI; the integration test checks the table
against a real server's `/object_info` (same inputs in the same order, same types, our values among its
choices), so it cannot silently drift from ComfyUI.
"""

from __future__ import annotations

# Choices we use; the real lists are longer (the integration test checks ours are in them).
SAMPLERS = ["euler", "euler_ancestral", "ddim", "dpmpp_2m"]
SCHEDULERS = ["normal", "karras", "simple", "ddim_uniform"]


def _info(name, required: dict, outputs: list[str], output_names: list[str] | None = None, output_node=False):
    return {"name": name, "input": {"required": required}, "input_order": {"required": list(required)},
            "output": outputs, "output_name": output_names or outputs, "output_node": output_node}


STOCK_NODES = {
    "CheckpointLoaderSimple": _info("CheckpointLoaderSimple", {"ckpt_name": ("COMBO", {"options": []})},
                                    ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": _info("CLIPTextEncode", {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})},
                            ["CONDITIONING"]),
    "EmptyLatentImage": _info("EmptyLatentImage", {
        "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}, ["LATENT"]),
    "KSampler": _info("KSampler", {
        "model": ("MODEL", {}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}),
        "sampler_name": ("COMBO", {"options": SAMPLERS}),
        "scheduler": ("COMBO", {"options": SCHEDULERS}),
        "positive": ("CONDITIONING", {}),
        "negative": ("CONDITIONING", {}),
        "latent_image": ("LATENT", {}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})}, ["LATENT"]),
    "VAEDecode": _info("VAEDecode", {"samples": ("LATENT", {}), "vae": ("VAE", {})}, ["IMAGE"]),
    "SaveImage": _info("SaveImage", {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                       [], output_node=True),
    "PreviewImage": _info("PreviewImage", {"images": ("IMAGE", {})}, [], output_node=True),
    "LoraLoader": _info("LoraLoader", {
        "model": ("MODEL", {}), "clip": ("CLIP", {}), "lora_name": ("COMBO", {"options": []}),
        "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0}),
        "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0})}, ["MODEL", "CLIP"]),
}
# Combo inputs whose choices are files on the user's machine: any value is accepted offline.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name")}
