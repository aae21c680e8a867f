"""Install layout, the ComfyUI entry point and the torchvision-free promise."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_trainers_under_comfy_rft_and_no_top_level_nodes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("comfy_rft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"comfy_rft"}, tops
    assert "comfy_rft/trainers/draft.py" in names
    assert "comfy_rft/nodes/__init__.py" in names
    # the toy world ships whole: `comfy-rft demo` after a plain `pip install .` trains on it
    for part in ("model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
                 "model/vae/config.json", "model/text_encoder/model.safetensors", "model/tokenizer/tokenizer.json",
                 "model/scheduler/scheduler_config.json", "proxy.safetensors", "gold.safetensors"):
        assert f"comfy_rft/toyworld/{part}" in names, part
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "comfy-rft = comfy_rft.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_comfyui_entry_point_imports_as_a_custom_node_package():
    """ComfyUI imports the pack folder as a package by path; that must work and stay light."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("comfy-rft", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfy-rft"] = module
        spec.loader.exec_module(module)
        assert callable(module.comfy_entrypoint)
        heavy = [m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules]
        assert not heavy, heavy
        import comfy_rft.trainers.draft
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_comfyui_gets_a_rewards_models_folder_that_the_engine_searches(tmp_path):
    code = textwrap.dedent(f"""
        import importlib.util, sys, types
        folder_paths = types.ModuleType("folder_paths")  # the two names of ComfyUI's registry we use
        folder_paths.models_dir = {str(tmp_path)!r}
        folder_paths.folder_names_and_paths = {{}}
        folder_paths.get_folder_paths = lambda name: folder_paths.folder_names_and_paths[name][0]
        sys.modules["folder_paths"] = folder_paths
        spec = importlib.util.spec_from_file_location("comfy-rft", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        from comfy_rft.rewards.weights import reward_dirs
        print(reward_dirs()[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "rewards")


def test_engine_imports_and_trains_with_torchvision_absent(tmp_path):
    """torchvision has no CPU build on the registries; nothing of ours may need it."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torchvision"] = None  # any `import torchvision` now raises ImportError
        import torch
        torch.set_num_threads(1)
        from comfy_rft.loop import train
        from comfy_rft.trainers.draft import DraftConfig, DraftMethod
        config = DraftConfig(steps=1, sampling_steps=2, batch_size=1, eval_samples=1, out={str(tmp_path)!r})
        result = train(DraftMethod, config, progress=False)
        assert result.steps == 1
        assert not any(m.startswith("torchvision") and sys.modules[m] is not None for m in list(sys.modules))
        print("trained")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("trained")
