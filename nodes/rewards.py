"""Reward nodes (load each built-in, a spec, combine, robust gradient, score images) and the prompt list.

Reward models are built inside `torch.inference_mode(False)`, so their weights are ordinary tensors a
trainer can backpropagate through (ComfyUI runs every node in inference mode).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

from . import paths
from .spec import PROMPTS, REWARD, Input, NodeDef, Output, Result

CATEGORY = "reward fine-tuning/rewards"
REWARD_OUT = Output("reward", REWARD, "The reward: scores images [B,3,H,W] in [0,1] against their prompts. Connect "
                    "it to a trainer, Score images, Combine rewards or Robust reward gradient.")


@dataclass(frozen=True)
class WeightFile:
    """A file (or folder) option of a built-in reward, shown as a picker over the reward folders."""

    option: str  # the factory's keyword (and the spec option)
    kind: str  # "file" or "folder"
    tooltip: str
    extensions: tuple[str, ...] = (".pt", ".pth", ".safetensors")


_AUTO_HELP = (" '(auto)' searches ComfyUI/models/rewards (and extra_model_paths.yaml's 'rewards' folders), "
              "$COMFY_RFT_REWARDS_DIR and the local Hugging Face cache for the published name; nothing is downloaded.")
_CLIP_H_TOKENIZER = WeightFile("tokenizer", "folder", "Folder with the CLIP ViT-H-14 tokenizer files "
                               "(CLIP-ViT-H-14-laion2B-s32B-b79K/)." + _AUTO_HELP)
_HPS_CHECKPOINT = WeightFile("checkpoint", "file", "The HPS checkpoint (HPS_v2_compressed.pt for 2.0, "
                             "HPS_v2.1_compressed.pt for 2.1), converted once to a transformers folder beside it."
                             + _AUTO_HELP)
# Per built-in reward: its file options (pickers). Built-ins not listed have none; the test checks every
# option here is a keyword of the reward's factory.
WEIGHT_FILES: dict[str, tuple[WeightFile, ...]] = {
    "aesthetic": (
        WeightFile("clip", "folder", "CLIP ViT-L/14 folder (clip-vit-large-patch14/: config.json, "
                   "model.safetensors)." + _AUTO_HELP),
        WeightFile("head", "file", "The aesthetic MLP head (sac+logos+ava1-l14-linearMSE.pth or "
                   "ava+logos-l14-reluMSE.pth)." + _AUTO_HELP),
    ),
    "hpsv2": (_HPS_CHECKPOINT, _CLIP_H_TOKENIZER),
    "hpsv2.1": (_HPS_CHECKPOINT, _CLIP_H_TOKENIZER),
    "pickscore": (
        WeightFile("model", "folder", "The PickScore_v1 CLIPModel folder." + _AUTO_HELP),
        WeightFile("tokenizer", "folder", "Tokenizer folder when PickScore_v1/ has none "
                   "(CLIP-ViT-H-14-laion2B-s32B-b79K/)." + _AUTO_HELP),
    ),
    "clipscore": (WeightFile("model", "folder", "A CLIP model folder with its tokenizer files "
                             "(clip-vit-large-patch14/)." + _AUTO_HELP),),
    "imagereward": (
        WeightFile("checkpoint", "file", "ImageReward.pt." + _AUTO_HELP),
        WeightFile("med_config", "file", "med_config.json (the BLIP text-encoder config)." + _AUTO_HELP, (".json",)),
        WeightFile("bert", "folder", "A bert-base-uncased folder with vocab.txt." + _AUTO_HELP),
    ),
}
# Per built-in reward: other options, as widgets (name, Input).
SETTINGS: dict[str, tuple[Input, ...]] = {
    "jpeg": (Input("quality", "INT", "JPEG quality the file size is measured at (DDPO: 95).", default=95, min=1,
                   max=100, step=1),),
    "jpeg-incompressibility": (Input("quality", "INT", "JPEG quality the file size is measured at (DDPO: 95).",
                                     default=95, min=1, max=100, step=1),),
    "aesthetic": (Input("variant", "COMBO", "The head's layout: 'auto' reads it from the file name "
                        "(…linearMSE / …reluMSE) or its keys.", default="auto", options=("auto", "linear", "relu")),),
    "ocr": (Input("text", "STRING", "The text the image should show; empty: the quoted part of each prompt "
                  "(a sign that says \"OPEN\").", default=""),),
}
# Optional Python packages a built-in needs beyond requirements.txt: (module, how to install).
OPTIONAL_DEPENDENCIES = {"ocr": ("rapidocr_onnxruntime", 'pip install "comfy-rft[ocr]"')}


def node_suffix(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _missing_dependency(name: str) -> str | None:
    module, how = OPTIONAL_DEPENDENCIES.get(name, (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"the {name} reward needs the Python package {module}, which is not installed: {how}"


def _spec_value(value) -> str:
    text = str(value)
    if re.search(r"[,()]", text):
        from comfy_rft.errors import UserError

        raise UserError(f"the path {text!r} contains ',', '(' or ')', which the reward spec cannot hold; rename it")
    return text


def load_spec(spec: str):
    """Build a reward outside inference mode, frozen, ready for gradients."""
    import torch

    from comfy_rft.rewards import load_reward

    with torch.inference_mode(False):
        return load_reward(spec)


def _builtin_run(name: str):
    def run(**kwargs):
        options = {}
        for wf in WEIGHT_FILES.get(name, ()):
            path = paths.resolve_reward_path(kwargs.get(wf.option, paths.AUTO))
            if path:
                options[wf.option] = _spec_value(path)
        for widget in SETTINGS.get(name, ()):
            value = kwargs.get(widget.name, widget.default)
            if value not in ("", "auto", None):
                options[widget.name] = _spec_value(value)
        spec = name + (f"({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")
        reward = load_spec(spec)
        return Result((reward,), text=[f"{reward.name}: {'differentiable' if reward.differentiable else 'not differentiable'}"
                                       f", typical range {reward.typical_range[0]:g}…{reward.typical_range[1]:g}"])
    return run


def builtin_reward_node(name: str) -> NodeDef:
    from comfy_rft.rewards import BUILTINS

    info = BUILTINS[name]
    inputs = [Input(wf.option, "COMBO", wf.tooltip, default=paths.AUTO,
                    options=lambda wf=wf: paths.reward_candidates(wf.kind, wf.extensions))
              for wf in WEIGHT_FILES.get(name, ())]
    inputs += list(SETTINGS.get(name, ()))
    grad = "differentiable" if info.differentiable else "not differentiable: only LaSRO-style methods can train on it"
    return NodeDef(
        node_id=f"RFTLoadReward_{node_suffix(name)}", display_name=f"RFT Load reward: {name}", category=CATEGORY,
        description=f"{info.summary} ({grad}). Files: {info.files}.", inputs=inputs, outputs=[REWARD_OUT],
        run=_builtin_run(name), unavailable=_missing_dependency(name))


def _run_spec(spec: str):
    reward = load_spec(spec)
    return Result((reward,), text=[f"{reward.name} ({'differentiable' if reward.differentiable else 'not differentiable'})"])


def _run_combine(reward_1, weight_1, reward_2=None, weight_2=1.0, reward_3=None, weight_3=1.0, reward_4=None,
                 weight_4=1.0):
    import torch

    from comfy_rft.rewards.combine import WeightedSum

    pairs = [(r, w) for r, w in ((reward_1, weight_1), (reward_2, weight_2), (reward_3, weight_3),
                                 (reward_4, weight_4)) if r is not None]
    with torch.inference_mode(False):
        combined = WeightedSum([r for r, _ in pairs], [w for _, w in pairs]).freeze()
    return Result((combined,), text=[combined.name])


def _run_robust(reward, rho, mode, samples):
    import torch

    from comfy_rft.rewards.robust import RobustReward

    with torch.inference_mode(False):
        robust = RobustReward(reward, rho=rho, mode=mode, samples=samples)
    return Result((robust,), text=[robust.name])


def _run_score(images, reward, prompts=None):
    import torch

    with torch.inference_mode(False), torch.no_grad():
        pixels = images.movedim(-1, 1).float().clone()
        device = next((p.device for p in reward.parameters()), pixels.device)
        batch_prompts = [prompts[i % len(prompts)] for i in range(len(pixels))] if prompts else [""] * len(pixels)
        scores = reward(pixels.to(device), batch_prompts).float().cpu()
    lines = [f"image {i + 1}: {s:.4f}" + (f"  ({p})" if p else "") for i, (s, p) in enumerate(zip(scores.tolist(),
                                                                                               batch_prompts))]
    mean = scores.mean().item()
    text = f"{reward.name}: mean {mean:.4f} over {len(scores)} image(s)\n" + "\n".join(lines)
    return Result((mean, text), text=[text])


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with '#' are comments (as the CLI reads prompt files)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _run_prompts(text, file=paths.NONE):
    from comfy_rft.errors import UserError

    source = "the text"
    if file and file != paths.NONE:
        folder = paths.input_dir()
        path = (folder / file) if folder else None
        if path is None or not path.is_file():
            raise UserError(f"prompt file {file} not found in ComfyUI's input folder")
        text, source = path.read_text(encoding="utf-8"), f"input/{file}"
    prompts = parse_prompts(text)
    if not prompts:
        raise UserError(f"no prompts in {source}: write one prompt per line")
    return Result((prompts, prompts[0]), text=[f"{len(prompts)} prompt(s) from {source}"])


def _weight(n: int) -> Input:
    return Input(f"weight_{n}", "FLOAT", f"Weight of reward {n} in the sum (negative to penalise).", default=1.0,
                 min=-1000.0, max=1000.0, step=0.01, round=1e-10)


def _reward_in(n: int, optional: bool) -> Input:
    return Input(f"reward_{n}", REWARD, f"Reward {n} of the weighted sum" + (" (optional)." if optional else "."),
                 optional=optional)


def reward_nodes() -> list[NodeDef]:
    from comfy_rft.rewards import BUILTINS
    from comfy_rft.rewards.robust import MODES

    nodes = [builtin_reward_node(name) for name in BUILTINS]
    nodes.append(NodeDef(
        node_id="RFTLoadRewardSpec", display_name="RFT Load reward (spec)", category=CATEGORY,
        description="Any reward the CLI understands, written as a spec: terms joined by '+', each "
                    "name[(key=value, …)][@weight], e.g. aesthetic@0.7+hpsv2.1@0.3, or your own module:function.",
        inputs=[Input("spec", "STRING", "The reward spec, e.g. brightness, aesthetic(target=6.5), "
                      "aesthetic@0.7+hpsv2.1@0.3 or mypackage.rewards:redness(differentiable=true).",
                      default="brightness")],
        outputs=[REWARD_OUT], run=_run_spec))
    nodes.append(NodeDef(
        node_id="RFTCombineRewards", display_name="RFT Combine rewards", category=CATEGORY,
        description="Weighted sum Σ wᵢ·rᵢ of up to four rewards; differentiable when every part is.",
        inputs=[_reward_in(1, False), _weight(1), _reward_in(2, True), _weight(2), _reward_in(3, True), _weight(3),
                _reward_in(4, True), _weight(4)],
        outputs=[REWARD_OUT], run=_run_combine))
    nodes.append(NodeDef(
        node_id="RFTRobustReward", display_name="RFT Robust reward gradient", category=CATEGORY,
        description="Scores x + δ instead of x: the worst-case small perturbation δ = −ρ·∇r/‖∇r‖ (adversarial, "
                    "RSA-FT's image-space part) or the mean over Gaussian perturbations of norm ρ (smooth), so "
                    "training follows rewards that survive small pixel changes instead of hacking the reward model.",
        inputs=[Input("reward", REWARD, "The differentiable reward to make robust."),
                Input("rho", "FLOAT", "ρ: L2 norm of the perturbation over the whole image in [0, 1] "
                      "(RSA-FT: 0.01).", default=0.01, min=0.0, max=100.0, step=0.001, round=1e-10),
                Input("mode", "COMBO", "adversarial: one worst-case step against the reward gradient; smooth: "
                      "average over random perturbations.", default="adversarial", options=tuple(MODES)),
                Input("samples", "INT", "smooth mode: random perturbations averaged per image.", default=4, min=1,
                      max=64, step=1)],
        outputs=[REWARD_OUT], run=_run_robust))
    nodes.append(NodeDef(
        node_id="RFTScoreImages", display_name="RFT Score images", category=CATEGORY,
        description="Scores IMAGEs with a reward and shows the scores.",
        inputs=[Input("images", "IMAGE", "The images to score."),
                Input("reward", REWARD, "The reward to score them with."),
                Input("prompts", PROMPTS, "Prompts of the images (cycled when there are fewer prompts than images). "
                      "Prompt-aware rewards (CLIP score, HPS, PickScore, ImageReward, OCR) need them.",
                      optional=True)],
        outputs=[Output("mean_score", "FLOAT", "The mean score over the images."),
                 Output("scores", "STRING", "Every image's score, one per line.")],
        run=_run_score, output_node=True))
    return nodes


def prompt_nodes() -> list[NodeDef]:
    return [NodeDef(
        node_id="RFTPromptList", display_name="RFT Prompt list", category="reward fine-tuning/prompts",
        description="Training prompts: one per line, typed here or read from a .txt file in ComfyUI's input folder.",
        inputs=[Input("text", "STRING", "One prompt per line; lines starting with # are ignored. Used when no file "
                      "is chosen.", default="a photo of a cat\na watercolor painting of a lighthouse", multiline=True),
                Input("file", "COMBO", "A .txt file in ComfyUI's input folder (one prompt per line); "
                      "'(none)' uses the text above.", default=paths.NONE, options=paths.prompt_files)],
        outputs=[Output("prompts", PROMPTS, "The prompt list, for a trainer or Score images."),
                 Output("first_prompt", "STRING", "The first prompt, e.g. for a CLIP Text Encode that renders a "
                        "sample.")],
        run=_run_prompts)]
