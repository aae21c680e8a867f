"""The pack in a real ComfyUI server: /object_info, the template browser, and every shipped workflow run end to end.

Runs when COMFYUI_DIR points at a ComfyUI source tree (skips with the reason otherwise). It uses the
helpers in ../shared/tools (COMFY_TOOLS to override): `comfy_here.sh` for the venv and the loopback
server, `comfy_ui_check.js` (Debian chromium + npm playwright-core; NODE_PATH or COMFY_UI_NODE_PATH) to
turn each UI-format workflow into its API form with the frontend ComfyUI serves, `comfy_run_prompt.py`
to run it. The server gets its own --base-directory (models, custom_nodes, input, output), so the
ComfyUI tree is not written to. Built once and cached outside the repository (COMFY_RFT_IT_CACHE,
default ~/.cache/comfy_rft/comfyui-it): a small SD1.5-architecture single-file checkpoint with random
weights (SD1.5's detected UNet identity, two levels, CLIP ViT-L and the SD VAE), made with ComfyUI's own
classes, and tiny aesthetic-reward files.

Workflows run at 64 px with a few steps; ComfyUI-side timings are printed and written to
<cache>/timings.json. The trained LoRA must land in models/loras, load in the stock LoraLoader with no
"lora key not loaded" line in the server log, change the image, and load in diffusers
(`load_lora_weights`) into the matching pipeline with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
TOOLS = Path(os.environ.get("COMFY_TOOLS", ROOT.parent / "shared" / "tools"))
CACHE = Path(os.environ.get("COMFY_RFT_IT_CACHE", Path.home() / ".cache" / "comfy_rft" / "comfyui-it"))
PORT = int(os.environ.get("COMFY_RFT_IT_PORT", "8231"))
CHECKPOINT = "rft_tiny_sd15arch.safetensors"
PACK = "comfy-rft"  # the folder name ComfyUI sees (and the template browser shows)

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
    reason="COMFYUI_DIR does not point at a ComfyUI source tree: the real-ComfyUI integration test is skipped "
           "(see ../shared/tools/README.md for getting one)")

# Written with ComfyUI's python: ComfyUI's own model classes and checkpoint writer.
MAKE_CHECKPOINT = r'''
import math, sys
import torch
comfy_dir, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args
args.cpu = True
import comfy.model_management as mm, comfy.model_patcher, comfy.sd, comfy.supported_models
from comfy.ldm.models.autoencoder import AutoencoderKL

UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "transformer_depth_output": [1, 1, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

def init_(module, gen):
    for name, p in module.named_parameters():
        if p.dim() == 1:  # norm scales 1, biases 0
            p.data = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
        else:
            p.data = torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:]))

gen = torch.Generator().manual_seed(0)
config = comfy.supported_models.SD15(UNET)
config.set_inference_dtype(torch.float32, None)
base = config.get_model({}, device=torch.device("cpu"))
init_(base.diffusion_model, gen)
model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
clip = comfy.sd.CLIP(config.clip_target(), embedding_directory=None)
init_(clip.cond_stage_model, gen)
with torch.no_grad():
    for name, p in clip.cond_stage_model.named_parameters():
        if "embedding" in name and p.dim() == 2:
            p.mul_(0.02 * math.sqrt(p.shape[1]))
kl = AutoencoderKL(ddconfig=VAE, embed_dim=4)
init_(kl, gen)
vae = comfy.sd.VAE(sd={k: v.clone() for k, v in kl.state_dict().items()})
comfy.sd.save_checkpoint(out, model, clip, vae, metadata={"comfy_rft.test": "SD1.5 architecture, random weights"})
'''


# ---------------------------------------------------------------------------------------------- helpers


def _http_json(path: str, timeout: float = 60):
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def _venv() -> Path:
    return Path(os.environ.get("COMFY_VENV", Path(COMFYUI_DIR).resolve().parent / "comfyvenv"))


def _here(*args, check=True, timeout=1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMFY_DIR=COMFYUI_DIR, COMFY_VENV=str(_venv()))
    return subprocess.run(["bash", str(TOOLS / "comfy_here.sh"), "--port", str(PORT), *args], env=env, check=check,
                          capture_output=True, text=True, timeout=timeout)


def _node_path() -> str | None:
    for candidate in (os.environ.get("COMFY_UI_NODE_PATH"), os.environ.get("NODE_PATH")):
        if candidate and (Path(candidate) / "playwright-core").is_dir():
            return candidate
    try:
        root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return root if root and (Path(root) / "playwright-core").is_dir() else None


def _tiny_reward_files(folder: Path) -> None:
    """LAION-aesthetic files in the upstream formats, tiny and random: a CLIP folder and an MLP head."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    if (folder / "sac+logos+ava1-l14-linearMSE.pth").is_file():
        return
    torch.manual_seed(7)
    config = CLIPConfig(projection_dim=32,
                        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                                         projection_dim=32),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=4, projection_dim=32))
    model = CLIPModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder / "clip-vit-large-patch14")
    sizes, head = [32, 24, 16, 12, 8, 1], {}
    for index, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        head[f"layers.{index}.weight"] = torch.randn(o, i) * (1.5 / math.sqrt(i))
        head[f"layers.{index}.bias"] = torch.randn(o) * 0.3
    torch.save(head, folder / "sac+logos+ava1-l14-linearMSE.pth")


def _diffusers_config(folder: Path) -> Path:
    """The diffusers configs of the test checkpoint's architecture (from_single_file needs them offline)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    if (folder / "model_index.json").is_file():
        return folder
    with torch.device("meta"):
        UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640), layers_per_block=1,
                             down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                             cross_attention_dim=768, attention_head_dim=8).save_config(folder / "unet")
        AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                      sample_size=512).save_config(folder / "vae")
    CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   projection_dim=768).save_pretrained(folder / "text_encoder")
    shutil.copytree(Path(COMFYUI_DIR) / "comfy" / "sd1_tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}))
    return folder


def _record_timing(name: str, seconds: float) -> None:
    path = CACHE / "timings.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = {"seconds": round(seconds, 1), "comfyui": _version(), "when": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(data, indent=1))


def _version() -> str:
    text = (Path(COMFYUI_DIR) / "comfyui_version.py").read_text()
    return text.split("=")[-1].strip().strip('"')


# ---------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    if not (TOOLS / "comfy_here.sh").is_file():
        pytest.skip(f"{TOOLS} has no comfy_here.sh (set COMFY_TOOLS)")
    CACHE.mkdir(parents=True, exist_ok=True)
    _here("setup")
    link = CACHE / PACK  # the pack under the folder name users get from a clone
    if not link.is_symlink():
        link.symlink_to(ROOT)
    _here("link", str(link))  # installs requirements.txt into ComfyUI's venv, as ComfyUI-Manager would
    checkpoint = CACHE / CHECKPOINT
    if not checkpoint.is_file():
        subprocess.run([str(_venv() / "bin" / "python"), "-c", MAKE_CHECKPOINT, COMFYUI_DIR, str(checkpoint)],
                       check=True, capture_output=True, text=True, timeout=1800)
    _tiny_reward_files(CACHE / "rewards")

    base = tmp_path_factory.mktemp("comfyui-base")
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK).symlink_to(ROOT)
    (base / "models" / "checkpoints" / CHECKPOINT).symlink_to(checkpoint)
    (base / "models" / "rewards").symlink_to(CACHE / "rewards")
    _here("stop", check=False)
    started = _here("start", "--", "--base-directory", str(base))
    log = Path(_here("log").stdout.strip())
    try:
        yield {"base": base, "log": log, "checkpoint": checkpoint, "start": started.stderr}
    finally:
        _here("stop", check=False)


def test_pack_loads_quickly_and_lists_every_node(comfy):
    from comfy_rft.nodes import node_defs
    from comfy_rft.nodes.spec import object_info

    log = comfy["log"].read_text()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if PACK in line), log[-3000:]
    live = _http_json("/object_info")
    for d in node_defs():
        assert d.node_id in live, d.node_id
        ours, theirs = object_info(d), live[d.node_id]
        assert theirs["input_order"]["required"] == ours["input_order"]["required"], d.node_id
        assert theirs["input_order"].get("optional", []) == ours["input_order"].get("optional", []), d.node_id
        for section in ("required", "optional"):
            for name, (typ, opts) in ours["input"].get(section, {}).items():
                live_type, live_opts = theirs["input"][section][name]
                assert (live_type if isinstance(live_type, str) else "COMBO") == typ, (d.node_id, name)
                assert live_opts.get("tooltip") == opts["tooltip"], (d.node_id, name)
                for key in ("default", "min", "max", "step", "control_after_generate"):
                    if key in opts:
                        assert live_opts.get(key) == opts[key], (d.node_id, name, key)
        assert theirs["output"] == ours["output"] and theirs["output_name"] == ours["output_name"], d.node_id
        assert theirs["output_tooltips"] == ours["output_tooltips"], d.node_id
        assert theirs["category"] == d.category and theirs["display_name"] == d.display_name
    # the reward file pickers list models/rewards
    def choices(node, name):
        typ, opts = live[node]["input"]["required"][name][:2]
        return typ if isinstance(typ, list) else opts["options"]

    assert "clip-vit-large-patch14" in choices("RFTLoadReward_aesthetic", "clip")
    assert "sac+logos+ava1-l14-linearMSE.pth" in choices("RFTLoadReward_aesthetic", "head")
    assert live["RFTTrain_draft"]["input"]["required"]["seed"][1]["control_after_generate"] is False
    # the pack's import time is on the start-up report; it must not weigh on ComfyUI's start
    times = [line for line in log.splitlines() if "seconds:" in line and PACK in line]
    assert times and float(times[0].split("seconds")[0].split()[-1]) < 1.0, times


def test_stock_node_table_matches_this_comfyui(comfy):
    from comfy_rft.nodes.stock_nodes import STOCK_NODES

    live = _http_json("/object_info")
    for name, ours in STOCK_NODES.items():
        theirs = live[name]
        assert theirs["input_order"]["required"] == ours["input_order"]["required"], name
        for inp, (typ, opts) in ours["input"]["required"].items():
            entry = theirs["input"]["required"][inp]
            live_type, live_opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if typ == "COMBO":
                choices = live_type if isinstance(live_type, list) else live_opts.get("options", [])
                assert set(opts["options"]) <= set(choices), (name, inp)
            else:
                assert live_type == typ, (name, inp)
            assert bool(live_opts.get("control_after_generate")) == bool(opts.get("control_after_generate")), name
        assert theirs["output"] == ours["output"], name


def test_workflows_are_offered_in_the_template_browser(comfy):
    templates = _http_json("/workflow_templates")
    assert set(templates.get(PACK, [])) >= {p.stem for p in (ROOT / "workflows").glob("*.json")}, templates


def _to_api(workflow: Path, out: Path, templates: bool) -> dict:
    """The API form of a UI workflow, made by the frontend ComfyUI serves (headless Chromium)."""
    node_path = _node_path()
    if node_path is None or shutil.which("chromium") is None and not os.environ.get("CHROMIUM"):
        pytest.skip("the UI -> API conversion needs Debian chromium and npm playwright-core (set NODE_PATH or "
                    "COMFY_UI_NODE_PATH to the node_modules folder that has it)")
    args = ["node", str(TOOLS / "comfy_ui_check.js"), f"http://127.0.0.1:{PORT}/", str(workflow), str(out)]
    if templates:
        args.append(PACK)
    run = subprocess.run(args, env=dict(os.environ, NODE_PATH=node_path), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "api_from_frontend.json").read_text())


@pytest.fixture(scope="module")
def apis(comfy, tmp_path_factory):
    """Each shipped workflow's API form from the frontend (converted once; the first also checks the templates)."""
    out, converted = tmp_path_factory.mktemp("frontend"), {}
    for i, path in enumerate(sorted((ROOT / "workflows").glob("*.json"))):
        converted[path.name] = _to_api(path, out / path.stem, templates=i == 0)
    return converted


def _quick(prompt: dict, **trainer) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        for key, value in {**QUICK.get(node["class_type"], {}),
                           **(trainer if node["class_type"].startswith("RFTTrain_") else {})}.items():
            assert key in node["inputs"], (node["class_type"], key)
            node["inputs"][key] = value
    return prompt


def _post(path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip() else {}


def _queue(prompt: dict) -> str:
    answer = _post("/prompt", {"prompt": prompt, "client_id": "comfy-rft-test"})
    assert not answer.get("node_errors"), answer
    return answer["prompt_id"]


def _wait(prompt_id: str, timeout: float = 1500) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _http_json(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") in ("success", "error") or entry["status"].get("completed"):
                return entry
        time.sleep(0.3)
    raise TimeoutError(prompt_id)


def _messages(entry: dict, kind: str) -> list:
    return [data for event, data in entry["status"]["messages"] if event == kind]


# Small and quick: the test model at 64 px, a few steps.
QUICK = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 4},
    "RFTTrain_draft": {"steps": 2, "sampling_steps": 4, "resolution": 64, "batch_size": 1, "eval_samples": 1,
                       "eval_every": 1, "preview_every": 1, "lr": 0.01, "checkpoint_every": 1},
    "RFTTrain_rsaft": {"steps": 1, "sampling_steps": 4, "resolution": 64, "batch_size": 1, "eval_samples": 1,
                       "eval_every": 1, "preview_every": 1, "lr": 0.01, "rho_param": 0.01},
    "RFTTrain_sqdf": {"steps": 2, "sampling_steps": 4, "resolution": 64, "batch_size": 1, "eval_samples": 1,
                      "eval_every": 1, "preview_every": 1, "lr": 0.01, "buffer_size": 8},
    "RFTTrain_lasro": {"steps": 2, "resolution": 64, "batch_size": 1, "eval_samples": 1, "eval_every": 1,
                       "preview_every": 1, "lr": 0.01, "surrogate_warmup": 1, "surrogate_steps": 2},
}


def _images(history: dict, base: Path) -> dict[str, list]:
    import numpy as np
    from PIL import Image

    found = {}
    for node_id, output in history["outputs"].items():
        for image in output.get("images", []):
            if image.get("type") == "output":
                path = base / "output" / image.get("subfolder", "") / image["filename"]
                found.setdefault(node_id, []).append(np.asarray(Image.open(path), dtype=np.float32))
    return found


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "workflows").glob("*.json")))
def test_shipped_workflow_runs(comfy, apis, name, tmp_path):
    workflow = ROOT / "workflows" / name
    ui_nodes = {str(n["id"]): n["type"] for n in json.loads(workflow.read_text())["nodes"]}
    assert {k: v["class_type"] for k, v in apis[name].items()} == ui_nodes
    prompt = _quick(apis[name])
    api = tmp_path / "api.json"
    api.write_text(json.dumps(prompt))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(TOOLS / "comfy_run_prompt.py"), str(api), "--port", str(PORT),
                          "--timeout", "1500", "--log", str(comfy["log"]), "--fail-on-log", "lora key not loaded",
                          "--fail-on-log", "NOT LOADED", "--json-out", str(tmp_path / "history.json"),
                          "--quiet-outputs"], capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    _record_timing(name, seconds)
    print(f"{name}: {seconds:.1f} s on ComfyUI {_version()}")
    history = json.loads((tmp_path / "history.json").read_text())
    outputs = history["outputs"]
    # ComfyUI drops an output whose inputs fail validation and still reports success: every output node ran
    output_nodes = {k for k, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage") or
                    v["class_type"].startswith(("RFTSave", "RFTPlot", "RFTScore"))}
    assert output_nodes <= set(outputs), (sorted(output_nodes - set(outputs)), run.stdout[-4000:],
                                          comfy["log"].read_text()[-4000:])

    if name == "rft_score_images.json":
        score = next(v for k, v in outputs.items() if prompt[k]["class_type"] == "RFTScoreImages")
        assert "aesthetic: mean" in score["text"][0] and "image 2:" in score["text"][0]
        return

    method = name.removeprefix("rft_train_").removesuffix(".json")
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "RFTSaveLoRA")
    lora_name = outputs[save_id]["text"][0].split("models/loras/")[1].split(":")[0]
    lora_file = comfy["base"] / "models" / "loras" / lora_name
    assert lora_file.is_file() and lora_name.startswith(f"rft/{method}_"), lora_name
    train_id = next(k for k, v in prompt.items() if v["class_type"] == f"RFTTrain_{method}")
    assert outputs[train_id]["images"], "the trainer shows a sample of the LoRA"

    images = _images(history, comfy["base"])

    def source(node_id, name):
        return prompt[node_id]["inputs"][name][0]

    loader = next(k for k, v in prompt.items() if v["class_type"] == "LoraLoader")
    by_model = {source(source(source(k, "images"), "samples"), "model"): k
                for k, v in prompt.items() if v["class_type"] == "SaveImage"}
    base_id, lora_id = by_model[source(loader, "model")], by_model[loader]
    difference = abs(images[base_id][0] - images[lora_id][0]).mean()
    assert difference > 0.5, f"the LoRA barely changes the image (mean |Δ| = {difference:.3f} of 255)"

    _check_diffusers_loads(comfy["checkpoint"], lora_file)


def _check_diffusers_loads(checkpoint: Path, lora_file: Path) -> None:
    """The same file in diffusers: the matching pipeline loads it with no missing or unexpected keys."""
    import torch
    from diffusers import StableDiffusionPipeline
    from lora_checks import assert_no_key_problems, captured_messages
    from safetensors import safe_open

    config = _diffusers_config(CACHE / "diffusers-config")
    pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    with safe_open(str(lora_file), "pt") as f:
        modules = {k.partition(".")[0] for k in f.keys()}
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert all(m.startswith("lora_unet_down_blocks_") or m.startswith("lora_unet_up_blocks_")
               or m.startswith("lora_unet_mid_block_") for m in modules), sorted(modules)[:3]
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = torch.randn(1, 77, 768)
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=context).sample
    with captured_messages() as messages:
        pipe.load_lora_weights(str(lora_file), adapter_name="rft")
    assert_no_key_problems(messages)
    layers = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "rft" in m.lora_A)
    assert layers == len(modules)
    with torch.no_grad():
        after = pipe.unet(x, t, encoder_hidden_states=context).sample
    assert not torch.allclose(before, after), "the LoRA does nothing in diffusers"


def test_same_inputs_reuse_the_trained_lora_and_a_new_seed_or_step_count_retrains(comfy, apis):
    prompt = _quick(apis["rft_train_draft.json"], seed=11, eval_every=0, preview_every=0, checkpoint_every=0)
    trainer = next(k for k, v in prompt.items() if v["class_type"] == "RFTTrain_draft")

    def trained(p) -> bool:
        entry = _wait(_queue(p))
        assert entry["status"]["status_str"] == "success", entry["status"]
        cached = {n for data in _messages(entry, "execution_cached") for n in data.get("nodes", [])}
        return trainer not in cached

    assert trained(prompt)
    assert not trained(prompt)  # ComfyUI's cache: the same inputs do not train again
    prompt[trainer]["inputs"]["seed"] = 12
    assert trained(prompt)
    prompt[trainer]["inputs"]["steps"] = 3
    assert trained(prompt)


def test_cancel_stops_after_the_step_keeps_a_checkpoint_and_resume_continues(comfy, apis):
    steps = 8
    prompt = _quick(apis["rft_train_draft.json"], seed=31, steps=steps, eval_every=0, preview_every=0,
                    checkpoint_every=0)
    log = comfy["log"]

    def since(offset: int) -> str:
        return log.read_bytes()[offset:].decode("utf-8", errors="replace")

    offset = log.stat().st_size
    prompt_id = _queue(prompt)
    deadline = time.time() + 600
    while f"draft step 1/{steps}" not in since(offset):
        assert time.time() < deadline, since(offset)
        time.sleep(0.1)
    cancelled_at = time.perf_counter()
    _post("/interrupt", {})
    entry = _wait(prompt_id)
    stopped_after = time.perf_counter() - cancelled_at
    assert _messages(entry, "execution_interrupted"), entry["status"]
    text = since(offset)
    done = max(int(line.split("step ")[1].split("/")[0]) for line in text.splitlines() if f"/{steps}:" in line)
    assert 1 <= done < steps and f"cancelled after {done} step(s)" in text, text[-2000:]
    step_seconds = max(float(line.rsplit(", ", 1)[1].split(" s")[0]) for line in text.splitlines()
                       if f"/{steps}:" in line)
    print(f"cancel: stopped {stopped_after:.1f} s after the request (a step takes {step_seconds:.1f} s), "
          f"after step {done}")
    assert stopped_after < 3 * step_seconds + 15
    kept = sorted((comfy["base"] / "models" / "loras" / "rft_checkpoints").glob("draft_*.safetensors"))
    assert kept, "the cancelled run's LoRA is kept for the loaders"
    runs = sorted((comfy["base"] / "output" / "rft_runs").glob("draft_*"), key=lambda p: p.stat().st_mtime)
    assert (runs[-1] / "checkpoints" / f"step-{done:07d}.pt").is_file()

    prompt[next(k for k, v in prompt.items() if v["class_type"] == "RFTTrain_draft")]["inputs"]["resume"] = "latest"
    offset = log.stat().st_size
    entry = _wait(_queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = since(offset)
    resumed = [int(line.split("step ")[1].split("/")[0]) for line in text.splitlines() if f"/{steps}:" in line]
    assert resumed == list(range(done + 1, steps + 1)), text[-2000:]


# In ComfyUI's python: the adapter on a tiny SDXL-architecture MODEL (text_time `y` conditioning), with a
# stand-in CLIP that returns what SDXL's does (cross-attention states and a 1280-d pooled output).
# Shared by the scripts below that run in ComfyUI's python: a small VAE config and a deterministic, well-scaled init.
TINY_PARTS = r"""
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
gen = torch.Generator().manual_seed(0)
def init_(module):
    for name, p in module.named_parameters():
        p.data = ((torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)) if p.dim() == 1
                  else torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
"""

SDXL_ADAPTER = r"""
import hashlib, json, logging, math, sys
comfy_dir, pack, loras, output = sys.argv[1:5]
sys.path.insert(0, comfy_dir)
sys.path.append(pack)
from comfy.cli_args import args
args.cpu = True
import torch
import comfy.model_management as mm, comfy.model_patcher, comfy.sd, comfy.supported_models, folder_paths
from comfy.ldm.models.autoencoder import AutoencoderKL
folder_paths.folder_names_and_paths["loras"] = ([loras], {".safetensors"})
folder_paths.set_output_directory(output)  # not the ComfyUI tree
UNET = {"model_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [0, 1], "context_dim": 64,
        "adm_in_channels": 2816, "num_classes": "sequential", "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "in_channels": 4, "out_channels": 4,
        "image_size": 32, "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
        "use_temporal_resblock": False, "use_checkpoint": False}
""" + TINY_PARTS + r"""class Clip:  # SDXL's CLIP output, tiny: cross-attention states and a pooled vector
    def tokenize(self, text):
        return text
    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        g = torch.Generator().manual_seed(int(hashlib.md5(tokens.encode()).hexdigest()[:8], 16))
        return {"cond": torch.randn(1, 77, 64, generator=g), "pooled_output": torch.randn(1, 1280, generator=g)}
with torch.inference_mode():  # as ComfyUI runs nodes
    config = comfy.supported_models.SDXL(UNET)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=torch.device("cpu"))
    init_(base.diffusion_model)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    kl = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    init_(kl)
    vae = comfy.sd.VAE(sd={k: v.clone() for k, v in kl.state_dict().items()}, config={"params": {"ddconfig": VAE, "embed_dim": 4}})
    from comfy_rft.nodes import node_defs
    defs = {d.node_id: d for d in node_defs()}
    reward = defs["RFTLoadReward_brightness"].run().values[0]
    node = defs["RFTTrain_draft"]
    settings = {i.name: i.default for i in node.inputs if i.is_widget}
    settings.update(steps=2, sampling_steps=3, resolution=64, batch_size=1, eval_samples=1, lr=1e-2, checkpoint_every=0)
    patched, payload, log = node.run(model=model, clip=Clip(), vae=vae, reward=reward, prompts=["a", "b"], **settings).values
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    loaded, _ = comfy.sd.load_lora_for_models(model, None, payload.state_dict, 1.0, 0)
    print(json.dumps({"architecture": payload.metadata["modelspec.architecture"],
                      "keys": sorted({k.partition(".")[0] for k in payload.state_dict}),
                      "grad_norms": [row["grad_norm"] for row in log.history],
                      "lora_warnings": [m for m in messages if "lora key" in m or "NOT LOADED" in m],
                      "patched": len(loaded.patches), "patched_by_node": len(patched.patches)}))
"""


def test_sdxl_model_trains_and_keeps_ldm_names():
    """The adapter on an SDXL-architecture MODEL: `y` conditioning, and LoRA keys in LDM/sgm names (the file
    contract for SDXL) that the stock loader applies in full."""
    if not (_venv() / "bin" / "python").is_file():
        pytest.skip(f"no ComfyUI venv at {_venv()} (comfy_here.sh setup makes one)")
    loras = CACHE / "sdxl-loras"
    loras.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([str(_venv() / "bin" / "python"), "-c", SDXL_ADAPTER, COMFYUI_DIR, str(ROOT), str(loras),
                          str(CACHE / "sdxl-output")],
                         capture_output=True, text=True, timeout=900, cwd=CACHE)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in result["keys"]), result["keys"][:3]
    assert all(g > 0 for g in result["grad_norms"]), result["grad_norms"]
    assert result["lora_warnings"] == [] and result["patched"] == result["patched_by_node"] == len(result["keys"])


# In ComfyUI's python: ComfyBackend.predict (through apply_model and model_sampling) returns exactly the
# network's own output, for ε and v models, with and without CFG.
PREDICT_EXACT = r"""
import json, math, sys
sys.path.insert(0, sys.argv[1])
sys.path.append(sys.argv[2])
from comfy.cli_args import args
args.cpu = True
import torch
import comfy.model_base, comfy.model_management as mm, comfy.model_patcher, comfy.sd, comfy.supported_models
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy_rft.nodes.comfy_backend import ComfyBackend, training_mode
UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "transformer_depth_output": [1, 1, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
gen = torch.Generator().manual_seed(0)
class Clip:
    def tokenize(self, text):
        return text
    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        g = torch.Generator().manual_seed(len(tokens))
        return {"cond": torch.randn(1, 77, 768, generator=g), "pooled_output": torch.randn(1, 768, generator=g)}
errors = {}
with torch.inference_mode():
    kl = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    vae = comfy.sd.VAE(sd={k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in kl.state_dict().items()},
                       config={"params": {"ddconfig": VAE, "embed_dim": 4}})
    for kind in ("EPS", "V_PREDICTION"):
        config = comfy.supported_models.SD15(dict(UNET))
        config.set_inference_dtype(torch.float32, None)
        base = comfy.model_base.BaseModel(config, model_type=getattr(comfy.model_base.ModelType, kind), device="cpu")
        for p in base.diffusion_model.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.05
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        with training_mode():
            backend = ComfyBackend(model, Clip(), vae, ["a cat", "a dog"], resolution=64)
            cond = backend.encode(["a cat", "a dog"])
            x = torch.randn(2, 4, 8, 8, generator=gen)
            for t in (999, 500, 20, 1):
                steps = torch.full((2,), float(t))
                with torch.no_grad():
                    net_c = base.diffusion_model(x, steps, context=cond.embeds)
                    net_u = base.diffusion_model(x, steps, context=cond.uncond)
                    got1, got7 = backend.predict(x, t, cond, 1.0), backend.predict(x, t, cond, 7.5)
                want7 = net_u + 7.5 * (net_c - net_u)
                errors[f"{kind} t={t}"] = max(float((got1 - net_c).abs().max() / net_c.abs().max()),
                                              float((got7 - want7).abs().max() / want7.abs().max()))
            errors[kind + " type"] = backend.schedule.prediction_type
print(json.dumps(errors))
"""


def test_the_adapter_returns_the_networks_own_epsilon_or_v():
    if not (_venv() / "bin" / "python").is_file():
        pytest.skip(f"no ComfyUI venv at {_venv()} (comfy_here.sh setup makes one)")
    run = subprocess.run([str(_venv() / "bin" / "python"), "-c", PREDICT_EXACT, COMFYUI_DIR, str(ROOT)],
                         capture_output=True, text=True, timeout=900, cwd=CACHE)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result.pop("EPS type") == "epsilon" and result.pop("V_PREDICTION type") == "v_prediction"
    assert all(error < 1e-3 for error in result.values()), result  # float32 round trip through x0


# In ComfyUI's python: LaSRO's surrogate backbone on ComfyUI's own UNetModel (LDM names) reads exactly what the
# model computes at its level boundaries (SD1.5 and SDXL, whose `y` goes through label_emb), and the LaSRO trainer
# node runs on an SDXL MODEL with the non-differentiable JPEG reward and writes its surrogate next to the LoRA.
LDM_ENCODER = r"""
import hashlib, json, math, sys
comfy_dir, pack, output = sys.argv[1:4]
sys.path.insert(0, comfy_dir)
sys.path.append(pack)
from comfy.cli_args import args
args.cpu = True
import torch
import comfy.model_management as mm, comfy.model_patcher, comfy.sd, comfy.supported_models, folder_paths
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy_rft.nodes.comfy_backend import ComfyBackend, training_mode
folder_paths.set_output_directory(output)
COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
          "legacy": False, "in_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
          "transformer_depth_middle": 1, "use_temporal_attention": False, "use_temporal_resblock": False}
MODELS = {
    "SD15": dict(COMMON, adm_in_channels=None, model_channels=32, transformer_depth=[1, 1], context_dim=768,
                 use_linear_in_transformer=False, transformer_depth_output=[1, 1, 1, 1]),
    "SDXL": dict(COMMON, adm_in_channels=2816, num_classes="sequential", model_channels=64, transformer_depth=[0, 1],
                 context_dim=64, use_linear_in_transformer=True, transformer_depth_output=[0, 0, 1, 1]),
}
""" + TINY_PARTS + r"""def clip_for(width, pooled):
    class Clip:
        def tokenize(self, text):
            return text
        def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
            g = torch.Generator().manual_seed(int(hashlib.md5(tokens.encode()).hexdigest()[:8], 16))
            return {"cond": torch.randn(1, 77, width, generator=g), "pooled_output": torch.randn(1, pooled, generator=g)}
    return Clip()
result = {}
with torch.inference_mode():
    kl = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    init_(kl)
    vae = comfy.sd.VAE(sd={k: v.clone() for k, v in kl.state_dict().items()}, config={"params": {"ddconfig": VAE, "embed_dim": 4}})
    for name, unet in MODELS.items():
        config = getattr(comfy.supported_models, name)(dict(unet))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({}, device=torch.device("cpu"))
        init_(base.diffusion_model)
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        clip = clip_for(unet["context_dim"], 1280 if name == "SDXL" else 768)
        with training_mode():
            backend = ComfyBackend(model, clip, vae, ["a cat", "a dog"], resolution=64)
            cond = backend.encode(["a cat", "a dog"])
            x = torch.randn(2, 4, 8, 8, generator=gen)
            net = base.diffusion_model
            encoder = backend.unet_encoder()
            caught = []
            # level boundaries: conv_in, each level's last input block (its downsampler but on the last), the middle
            ends = [0, 2, 3]
            # (the UNet runs its TimestepEmbedSequentials layer by layer, so hook each one's last layer)
            hooks = [net.input_blocks[i][-1].register_forward_hook(lambda m, i, o: caught.append(o)) for i in ends]
            hooks.append(net.middle_block[-1].register_forward_hook(lambda m, i, o: caught.append(o)))
            with torch.no_grad():
                kwargs = {"y": cond.pooled} if cond.pooled is not None else {}
                net(x, torch.full((2,), 50.0), context=cond.embeds, **kwargs)
                ours = encoder(x, 50, cond)
            for h in hooks:
                h.remove()
            result[name] = {"levels": len(ours), "channels": encoder.feature_channels,
                            "error": max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, caught)),
                            "shapes_match": [tuple(a.shape) for a in ours] == [tuple(b.shape) for b in caught]}
            backend.remove_lora()
    from comfy_rft.nodes import node_defs
    defs = {d.node_id: d for d in node_defs()}
    reward = defs["RFTLoadReward_jpeg"].run().values[0]
    node = defs["RFTTrain_lasro"]
    settings = {i.name: i.default for i in node.inputs if i.is_widget}
    settings.update(steps=2, resolution=64, batch_size=1, eval_samples=1, lr=1e-2, checkpoint_every=0, surrogate_warmup=1,
                    surrogate_steps=2)
    patched, payload, log = node.run(model=model, clip=clip, vae=vae, reward=reward, prompts=["a", "b"], **settings).values
    result["trained"] = {"steps": len(log.history), "keys": len(payload.state_dict),
                         "metrics": sorted(k for k in log.history[-1] if "surrogate" in k or "queries" in k),
                         "surrogate_file": any(p.name.endswith("_surrogate.safetensors") for p in
                                               __import__("pathlib").Path(log.run_dir).iterdir())}
print(json.dumps(result))
"""


def test_lasro_surrogate_reads_comfyuis_unet_and_the_node_trains():
    if not (_venv() / "bin" / "python").is_file():
        pytest.skip(f"no ComfyUI venv at {_venv()} (comfy_here.sh setup makes one)")
    CACHE.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([str(_venv() / "bin" / "python"), "-c", LDM_ENCODER, COMFYUI_DIR, str(ROOT),
                          str(CACHE / "lasro-output")], capture_output=True, text=True, timeout=900, cwd=CACHE)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("SD15", "SDXL"):
        assert result[name]["levels"] == 4 and result[name]["shapes_match"], result[name]
        assert result[name]["error"] < 1e-5, result[name]
    trained = result["trained"]
    assert trained["steps"] == 2 and trained["keys"] > 0 and trained["surrogate_file"], trained
    assert {"surrogate_reward", "surrogate_pair_accuracy", "reward_queries", "surrogate_gap"} <= set(trained["metrics"])
