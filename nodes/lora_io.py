"""LoRA files: save into models/loras (the stock LoraLoader lists it at once), load one to train further, push to the Hub."""

from __future__ import annotations

import importlib.util
import os

from . import paths
from .payloads import LoraPayload, TrainingLog
from .spec import LORA, TRAINING_LOG, ComboName, Input, NodeDef, Output, Result

CATEGORY = "reward fine-tuning/lora"
LORA_NAME_TYPE = ComboName("COMBO")


def _run_save(lora: LoraPayload, filename_prefix: str) -> Result:
    from comfy_rft import lora as lora_lib

    folder = paths.loras_dir()
    path = paths.next_free_name(folder, paths.safe_relative(filename_prefix))
    metadata = dict(lora.metadata, **{"modelspec.title": path.stem})
    lora_lib.save_lora(path, lora.state_dict, metadata)
    name = os.path.relpath(path, folder)
    return Result((name,), text=[f"saved models/loras/{name}: {lora.describe()}"])


def _run_load(lora_name: str) -> Result:
    from comfy_rft import lora as lora_lib

    path = paths.lora_path(lora_name)
    state, metadata = lora_lib.read_lora(path)
    payload = LoraPayload(state, metadata, source=str(path))
    return Result((payload,), text=[f"{lora_name}: {payload.describe()}"])


def _hub_unavailable() -> str | None:
    if importlib.util.find_spec("comfy_rft.hub") is None:
        return "comfy_rft.hub is not part of this installation; update comfy-rft"
    if importlib.util.find_spec("huggingface_hub") is None:
        return "the Python package huggingface_hub is not installed: pip install huggingface_hub"
    return None


def _run_push(lora_name: str, repo_id: str, private: bool, log: TrainingLog | None = None) -> Result:
    from pathlib import Path

    from comfy_rft.hub import push_lora

    path = paths.lora_path(lora_name)
    samples, curve, metrics, config = [], None, None, None
    if log is not None:
        run = Path(log.run_dir)
        samples = [p for p in (run / "before_after.png",) if p.is_file()]
        curve = run / "reward_curve.png" if (run / "reward_curve.png").is_file() else None
        metrics = {**log.summary, "evaluations": log.evaluations} if log.summary else None
        config = {"method": log.method, **log.config}
    url = push_lora(path, repo_id, samples=samples, reward_curve=curve, config=config, metrics=metrics,
                    private=private)
    return Result((url,), text=[f"pushed {lora_name} to {url}"])


def lora_nodes() -> list[NodeDef]:
    lora_name_input = dict(options=paths.lora_files)
    return [
        NodeDef(
            node_id="RFTSaveLoRA", display_name="RFT Save LoRA", category=CATEGORY,
            description="Writes the LoRA into models/loras/ (kohya keys; diffusers block names for SD1.x/SD2 so "
                        "diffusers loads it too; metadata: base model, method, reward, the run's config). The stock "
                        "Load LoRA lists it at once; connect lora_name to its lora_name input to use it in the same run.",
            inputs=[Input("lora", LORA, "The LoRA from an RFT Train node (or RFT Load LoRA)."),
                    Input("filename_prefix", "STRING", "File name under models/loras/ (sub-folders allowed); a "
                          "counter is appended, e.g. rft/draft_00001.safetensors.", default="rft/lora")],
            outputs=[Output("lora_name", LORA_NAME_TYPE, "The saved file's name in models/loras, for the lora_name "
                            "input of the stock Load LoRA node (or RFT Push LoRA to Hub).")],
            run=_run_save, output_node=True),
        NodeDef(
            node_id="RFTLoadLoRA", display_name="RFT Load LoRA for training", category=CATEGORY,
            description="Reads a LoRA file from models/loras/ to continue training it (the resume input of a trainer).",
            inputs=[Input("lora_name", "COMBO", "A LoRA file in models/loras (checkpoints of cancelled runs are in "
                          "rft_checkpoints/).", **lora_name_input)],
            outputs=[Output("lora", LORA, "The LoRA, for a trainer's resume input or RFT Save LoRA.")],
            run=_run_load),
        NodeDef(
            node_id="RFTPushLoRAToHub", display_name="RFT Push LoRA to Hub", category=CATEGORY,
            description="Publishes a LoRA file from models/loras to a Hugging Face Hub model repo in one commit, with a "
                        "model card built from its metadata (and the run's samples and curve when a log is "
                        "connected). The token comes from the HF_TOKEN environment variable or `hf auth login`, "
                        "never from a node input (ComfyUI writes inputs into image metadata).",
            inputs=[Input("lora_name", "COMBO", "The LoRA file in models/loras (connect RFT Save LoRA's lora_name).",
                          **lora_name_input),
                    Input("repo_id", "STRING", "The Hub repo, user/name or org/name (created if missing).",
                          default="your-name/my-reward-lora"),
                    Input("private", "BOOLEAN", "Create the repo as private.", default=True),
                    Input("log", TRAINING_LOG, "Optional training log: adds the run's before/after samples, reward "
                          "curve, config and metrics to the model card.", optional=True)],
            outputs=[Output("url", "STRING", "The repo's URL.")],
            run=_run_push, output_node=True, unavailable=_hub_unavailable()),
    ]
