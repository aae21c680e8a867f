"""Trainer nodes, one per method in `trainers.METHODS` (new methods get a node automatically), and the plot node.

A trainer node is the engine's `comfy_rft.loop.train` on a `ComfyBackend`: the method's Config dataclass
gives the widgets (defaults, bounds, help as tooltips), the loop does the training, and this file only
adds what ComfyUI needs around it: the progress bar with previews, Cancel (the LoRA of the last finished
step is kept as a checkpoint), held-out evaluation, resume, and the MODEL with the LoRA applied.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import paths
from .payloads import LoraPayload, TrainingLog
from .spec import LORA, PROMPTS, REWARD, TRAINING_LOG, Input, NodeDef, Output, Result, config_inputs

log = logging.getLogger("comfy_rft")

CATEGORY = "reward fine-tuning/train"
# Config fields that are not widgets here: the MODEL/CLIP/VAE, reward, prompts and held-out rewards
# arrive on sockets, ComfyUI picks the device, files go to ComfyUI's folders, the Hub has its own node.
NOT_WIDGETS = {"model", "model_config", "reward", "prompts", "eval_prompts", "eval_rewards", "out", "device",
               "push_to_hub"}
RUNS_FOLDER = "rft_runs"
# What a Config option means in ComfyUI where the command line's words (--out) do not apply.
NOTES = {
    "resume": f"In ComfyUI: 'latest' continues the newest run of this node with the same settings (its folder in "
              f"output/{RUNS_FOLDER}/; raise steps to train longer), or give a checkpoint file's path.",
    "checkpoint_every": f"Checkpoints go to the run's folder in output/{RUNS_FOLDER}/; a cancelled run writes one "
                        f"too.",
    "eval_every": "Held-out rewards connected to this node are scored at every evaluation.",
}
PRETTY = {"draft": "DRaFT", "rsaft": "RSA-FT", "sqdf": "SQDF", "lasro": "LaSRO"}
CHECKPOINT_FOLDER = "rft_checkpoints"


def pretty(key: str) -> str:
    return PRETTY.get(key, key.upper())


WIDGET_ORDER_FILE = Path(__file__).with_name("widget_order.py")


def widget_order() -> dict[str, list[str]]:
    """The recorded widget order of each trainer node (nodes/widget_order.py).

    A UI workflow stores widget values by position, so a Config option added in the middle of a dataclass
    would shift every saved workflow's values. Widgets keep the recorded order; new ones come after it
    (`python -m comfy_rft.nodes.workflows` records them).
    """
    from .widget_order import WIDGET_ORDER

    return {k: list(v) for k, v in WIDGET_ORDER.items()}


def _ordered(node_id: str, inputs: list[Input]) -> list[Input]:
    recorded = widget_order().get(node_id, [])
    widgets = {i.name: i for i in inputs if i.is_widget}
    names = [n for n in recorded if n in widgets] + [n for n in widgets if n not in recorded]
    sockets = [i for i in inputs if not i.is_widget]
    required = [i for i in sockets if not i.optional] + [widgets[n] for n in names]
    return required + [i for i in sockets if i.optional]


def trainer_node(key: str, config_cls, method_cls) -> NodeDef:
    name = pretty(key)
    inputs = [
        Input("model", "MODEL", "The diffusion model to fine-tune (SD1.x, SD2.x or SDXL, from Load Checkpoint). It is "
              "not modified: the trained LoRA is applied to a copy, returned below."),
        Input("clip", "CLIP", "The text encoder that encodes the prompts (frozen)."),
        Input("vae", "VAE", "The VAE whose decoder turns samples into images for the reward (frozen; the reward "
              "gradient flows through it)."),
        Input("reward", REWARD, "The reward to maximise (RFT Load reward, Combine rewards, Robust reward gradient)."),
        Input("prompts", PROMPTS, "Training prompts (RFT Prompt list)."),
        *config_inputs(config_cls, NOT_WIDGETS, NOTES),
        Input("preview_every", "INT", "Show a sample of the current LoRA (first evaluation prompt and seed) on the "
              "node every N steps; free at evaluation steps. 0: only at evaluations.", default=10, min=0,
              max=100000, step=1),
        Input("eval_reward", REWARD, "Optional held-out reward, only measured (never trained on) at every evaluation: "
              "its curve shows whether the training reward is being hacked.", optional=True),
        Input("eval_reward_2", REWARD, "Optional second held-out reward.", optional=True),
        Input("eval_prompts", PROMPTS, "Optional held-out prompts for the evaluations; default: the training prompts.",
              optional=True),
        Input("init_lora", LORA, "Optional LoRA to start from instead of a fresh one (RFT Load LoRA, e.g. a "
              f"cancelled run's models/loras/{CHECKPOINT_FOLDER}/ file); its rank, alpha and layers must match the "
              "settings. For an exact continuation (optimiser state too) use resume.", optional=True),
    ]
    doc = (config_cls.__doc__ or "").strip().splitlines()[0]
    node_id = f"RFTTrain_{key}"
    return NodeDef(
        node_id=node_id, display_name=f"RFT Train {name}", category=CATEGORY,
        description=f"{name} reward fine-tuning of a LoRA. {doc} Returns the MODEL with the LoRA, the LoRA (save it "
                    f"with RFT Save LoRA) and a training log. Same inputs: ComfyUI reuses the result; a new seed or "
                    f"step count trains again. Cancel stops after the current step and keeps a checkpoint (a second Cancel "
                    f"aborts at once).",
        inputs=_ordered(node_id, inputs),
        outputs=[Output("model", "MODEL", "The input MODEL with the trained LoRA applied (strength 1)."),
                 Output("lora", LORA, "The trained LoRA (kohya keys, diffusers block names for SD1.x/SD2, metadata)."),
                 Output("log", TRAINING_LOG, "Per-step metrics, evaluations and the run folder (for RFT Plot "
                        "training and RFT Push LoRA to Hub).")],
        run=lambda **kwargs: run_trainer(key, **kwargs))


def trainer_nodes() -> list[NodeDef]:
    from comfy_rft.trainers import METHODS

    return [trainer_node(key, config_cls, method_cls) for key, (config_cls, method_cls) in METHODS.items()]


# ---------------------------------------------------------------------------------------------- the run


def export_lora(backend, config, method_name: str, reward_name: str, steps: int, size: int) -> LoraPayload:
    """The run's LoRA in the file contract: SD1.x/SD2 layers renamed from ComfyUI's LDM names to diffusers'."""
    from comfy_rft import lora as lora_lib

    state = lora_lib.lora_state_dict(backend.denoiser)
    if backend.family in ("sd1", "sd2"):
        mapping = lora_lib.ldm_to_diffusers_lora_names(backend.lora_layer_paths(), backend.layers_per_block())
        state = lora_lib.rename_lora_modules(state, mapping)
    metadata = lora_lib.lora_metadata(
        base_model=config.model, architecture=backend.architecture, method=method_name, reward=reward_name,
        config={"method": method_name, **config.to_dict(), "steps_done": steps}, rank=config.lora_rank,
        alpha=config.lora_alpha, resolution=size, prediction_type=backend.schedule.prediction_type,
        title=f"{method_name}_{reward_name}")
    return LoraPayload(state, metadata, source=config.out)


def load_init_lora(backend, payload: LoraPayload, config) -> None:
    """Copy a LoRA file's weights into the run's freshly injected adapter (names in either convention)."""
    import torch

    from comfy_rft import lora as lora_lib
    from comfy_rft.errors import UserError

    layer_paths = backend.lora_layer_paths()
    state = payload.state_dict
    if backend.family in ("sd1", "sd2"):
        to_ldm = {d: m for m, d in lora_lib.ldm_to_diffusers_lora_names(layer_paths, backend.layers_per_block()).items()}
        state = lora_lib.rename_lora_modules(state, to_ldm)
    groups: dict[str, dict] = {}
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        if name.startswith("lora_unet_"):
            groups.setdefault(name, {})[part] = tensor
    wanted = {lora_lib.kohya_module_name("lora_unet", p): p for p in layer_paths}
    missing, extra = sorted(set(wanted) - set(groups)), sorted(set(groups) - set(wanted))
    if missing or extra:
        raise UserError(f"init_lora targets other layers than this run ({len(missing)} of the run's layers missing, "
                        f"e.g. {missing[:2]}; {len(extra)} extra, e.g. {extra[:2]}); set lora_targets to the layers it "
                        f"was trained on (its metadata holds its run's config)")
    with torch.no_grad():
        for name, path in wanted.items():
            parts, layer = groups[name], backend.denoiser.get_submodule(path)
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
            if down.shape[0] != config.lora_rank or abs(alpha - config.lora_alpha) > 1e-6 * max(1.0, alpha):
                raise UserError(f"init_lora has rank {down.shape[0]} and alpha {alpha:g}; set lora_rank="
                                f"{down.shape[0]} and lora_alpha={alpha:g} to continue it")
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if a.shape != down.shape or b.shape != up.shape:
                raise UserError(f"init_lora's layer {name} has shapes {tuple(down.shape)}/{tuple(up.shape)}, this "
                                f"model needs {tuple(a.shape)}/{tuple(b.shape)}: it belongs to another model")
            a.copy_(down.to(a))
            b.copy_(up.to(b))


def run_key(config, method: str) -> str:
    """A name for the run's settings: the same settings (bar steps and other resumable options) give the
    same key, so resume='latest' finds the run to continue."""
    import hashlib
    import json

    from comfy_rft.checkpoint import RESUMABLE_CHANGES

    settings = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    digest = hashlib.sha256(json.dumps({"method": method, **settings}, sort_keys=True, default=str).encode())
    return f"{method}_{digest.hexdigest()[:10]}"


def run_folder(config, method: str):
    """A new folder for this run, or (resume='latest') the newest earlier run with the same settings."""
    from comfy_rft.errors import UserError

    root = paths.output_dir() / RUNS_FOLDER
    key = run_key(config, method)
    if config.resume == "latest":
        earlier = sorted((p for p in root.glob(f"{key}_*") if (p / "checkpoints").is_dir()), key=lambda p: p.name)
        if not earlier:
            raise UserError(f"resume=latest: no earlier run of this node with these settings in {root} (the "
                            f"settings, prompts, reward and model must be the same; only steps and similar may "
                            f"change). Clear resume to start a new run.")
        return earlier[-1]
    return root / f"{key}_{time.strftime('%Y%m%d-%H%M%S')}"


def model_fingerprint(denoiser) -> str:
    """A short fingerprint of the UNet's weights (first and last conv, first attention), to tell checkpoints apart."""
    import hashlib

    digest = hashlib.sha256()
    names = [n for n, _ in denoiser.named_parameters()]
    picks = [n for n in names if n.endswith("weight")][:1] + [n for n in names if "attn1.to_q" in n][:1] + \
            [n for n in names if n.endswith("weight")][-1:]
    params = dict(denoiser.named_parameters())
    for name in picks:
        digest.update(params[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


class Tracker:
    """What the node adds around the engine's loop: progress bar, previews, held-out rewards, Cancel, init_lora."""

    def __init__(self, *, key, config, backend, prompts, eval_prompts, eval_rewards, preview_every, init_lora,
                 training_log: TrainingLog):
        import comfy.utils

        from comfy_rft.seeding import derive_seed

        self.key, self.config, self.backend = key, config, backend
        self.prompts, self.eval_prompts, self.eval_rewards = prompts, eval_prompts, eval_rewards
        self.preview_every, self.init_lora, self.log = preview_every, init_lora, training_log
        self.total = config.steps
        self.pbar = comfy.utils.ProgressBar(self.total)
        self.eval_seed = derive_seed(config.seed, "evaluation")  # the loop's own evaluation seed
        self.method = None
        self.cache: dict = {}
        self.cache_version = None
        self.last_images = None
        self.cancelled = False
        self.steps_done = 0

    def method_class(self, method_cls):
        """The method with two hooks: it tells us when the loop has injected the LoRA (the `params` assignment),
        and it caches `generate` per LoRA state, so our evaluations and previews reuse the loop's samples."""
        tracker = self

        class Tracked(method_cls):
            @property
            def params(self):
                return self.__dict__.get("_rft_params", [])

            @params.setter
            def params(self, value):
                self.__dict__["_rft_params"] = value
                if value:
                    tracker.on_start(self)

            def generate(self, prompts, seed):
                # Parameters' version counters move on every in-place update (optimiser step, SAM, copy_).
                version = sum(p._version for p in self.params)
                if version != tracker.cache_version:
                    tracker.cache, tracker.cache_version = {}, version
                key = (tuple(prompts), seed)
                if key not in tracker.cache:
                    tracker.cache[key] = super().generate(prompts, seed)
                return tracker.cache[key]

        Tracked.__name__ = Tracked.__qualname__ = method_cls.__name__
        return Tracked

    def on_start(self, method):
        self.method = method
        if self.init_lora is not None:
            load_init_lora(self.backend, self.init_lora, self.config)
        if not self.config.resume:  # the loop evaluates next: score the held-out rewards on the same images
            self.evaluate(0)

    def on_step(self, row: dict) -> bool:
        import comfy.model_management as mm

        step = self.steps_done = row["step"]
        self.log.history.append(row)
        log.info("comfy_rft %s step %d/%d: reward %.4f, grad norm %.3g, %.1f s", self.key, step, self.total,
                 row["reward_mean"], row["grad_norm"], row["seconds"])
        def cancel_pending() -> bool:
            return mm.processing_interrupted() or getattr(self.backend, "cancel_requested", False)

        try:
            if not cancel_pending():
                eval_every = self.config.eval_every
                if step == self.total or (eval_every and step % eval_every == 0):  # the loop evaluated, or will
                    self.evaluate(step)
                elif self.preview_every and step % self.preview_every == 0:
                    self.preview(step)
                else:
                    self.pbar.update_absolute(step, self.total)  # ComfyUI's hook raises on Cancel
            if not cancel_pending():
                return False
        except mm.InterruptProcessingException:
            pass
        # Cancel: stop after this step; the loop writes a checkpoint and the LoRA, the node keeps the LoRA
        mm.interrupt_current_processing(False)  # and a second Cancel aborts at once (ComfyBackend)
        self.cancelled = self.backend.cancelled = True
        log.warning("comfy_rft: %s cancelled at step %d/%d; writing a checkpoint and the LoRA", self.key, step,
                    self.total)
        return True

    def _show(self, step: int, images) -> None:
        from comfy_rft.plots import to_pil

        self.last_images = images
        self.pbar.update_absolute(step, self.total, ("JPEG", to_pil(images[:1])[0], 512))

    def preview(self, step: int) -> None:
        from comfy_rft.seeding import derive_seed

        c = self.config
        count = min(c.batch_size, c.eval_samples)
        batch = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(count)]
        self._show(step, self.method.generate(batch, derive_seed(self.eval_seed, "eval", 0)).cpu())

    def evaluate(self, step: int) -> None:
        from comfy_rft.evaluation import evaluate

        c = self.config
        held_out = {r.name: r for r in self.eval_rewards}
        result = evaluate(self.method, self.eval_prompts, c.eval_samples, self.eval_seed, c.batch_size, held_out)
        self.log.evaluations.append({"step": step, "reward": result.reward, "diversity": result.diversity,
                                     "heldout": dict(result.held_out)})
        self._show(step, result.images)


def run_trainer(key: str, *, model, clip, vae, reward, prompts, preview_every=10, eval_reward=None,
                eval_reward_2=None, eval_prompts=None, init_lora=None, **settings) -> Result:
    import comfy.model_management as mm
    import comfy.sd

    from comfy_rft import lora as lora_lib
    from comfy_rft.errors import UserError
    from comfy_rft.loop import train
    from comfy_rft.trainers import METHODS

    from .comfy_backend import ComfyBackend, make_autograd_safe, training_mode

    config_cls, method_cls = METHODS[key]
    config = config_cls(**settings, model="ComfyUI MODEL", reward=reward.name, prompts="\n".join(prompts),
                        eval_prompts="\n".join(eval_prompts) if eval_prompts else "", out="", device="auto")
    config.validate()
    if method_cls.needs_differentiable_reward and not reward.differentiable:
        raise UserError(f"{pretty(key)} backpropagates the reward, but {reward.name} is not differentiable; use a "
                        f"differentiable reward")
    if init_lora is not None and config.resume:
        raise UserError("give either init_lora (start from a LoRA) or resume (continue a run exactly), not both")
    eval_rewards = [r for r in (eval_reward, eval_reward_2) if r is not None]
    if len({r.name for r in eval_rewards}) < len(eval_rewards):
        raise UserError("the two held-out rewards have the same name; connect different rewards")

    with training_mode():
        backend = ComfyBackend(model, clip, vae, [*prompts, *(eval_prompts or [])], resolution=config.resolution)
        config.model = f"ComfyUI {backend.family} checkpoint #{model_fingerprint(backend.denoiser)}"
        run_dir = run_folder(config, key)
        config.out = str(run_dir)
        for r in (reward, *eval_rewards):
            r.to(backend.device)
            make_autograd_safe(r)
        training_log = TrainingLog(method=key, reward=reward.name, config=config.to_dict(), run_dir=str(run_dir))
        tracker = Tracker(key=key, config=config, backend=backend, prompts=prompts,
                          eval_prompts=list(eval_prompts or prompts), eval_rewards=eval_rewards,
                          preview_every=preview_every, init_lora=init_lora, training_log=training_log)
        try:
            result = train(tracker.method_class(method_cls), config, backend=backend, reward=reward,
                           on_step=tracker.on_step, progress=False)
            payload = export_lora(backend, config, method_cls.name, reward.name, result.steps, tracker.method.size)
        finally:
            backend.remove_lora()
            tracker.cache.clear()

    training_log.summary = result.summary()
    if tracker.cancelled:  # keep the LoRA where the loaders see it, then tell ComfyUI the prompt was cancelled
        path = paths.loras_dir() / CHECKPOINT_FOLDER / f"{run_dir.name}.safetensors"
        lora_lib.save_lora(path, payload.state_dict, payload.metadata)
        training_log.checkpoint = str(path)
        log.warning("comfy_rft: %s cancelled after %d step(s): LoRA in %s; checkpoint in %s (resume=latest continues "
                    "it)", key, result.steps, path, run_dir / "checkpoints")
        raise mm.InterruptProcessingException()
    patched, _ = comfy.sd.load_lora_for_models(model, None, payload.state_dict, 1.0, 0)
    images = tracker.last_images
    preview = images.movedim(1, -1).contiguous() if images is not None else None
    return Result((patched, payload, training_log), text=[training_log.text()], images=preview)


# ---------------------------------------------------------------------------------------------- plot


def _run_plot(log: TrainingLog) -> Result:
    import numpy as np
    import torch
    from PIL import Image

    from comfy_rft.plots import plot_curves

    folder = paths.temp_dir() / "comfy_rft_plots"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.time_ns()}"
    series = {"training reward (batch mean)": ([h["step"] for h in log.history], [h["reward_mean"] for h in log.history])}
    if log.evaluations:
        series["evaluation reward"] = ([e["step"] for e in log.evaluations], [e["reward"] for e in log.evaluations])
    files = [plot_curves(series, folder / f"train_{stamp}.png", title=f"{pretty(log.method)}: {log.reward}")]
    names = sorted({n for e in log.evaluations for n in e.get("heldout", {})})
    if names:
        heldout = {f"held-out {n}": ([e["step"] for e in log.evaluations if n in e["heldout"]],
                                     [e["heldout"][n] for e in log.evaluations if n in e["heldout"]]) for n in names}
        files.append(plot_curves(heldout, folder / f"heldout_{stamp}.png", title="held-out rewards (not trained on)"))
    pictures = [Image.open(f).convert("RGB") for f in files]
    canvas = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    y = 0
    for p in pictures:
        canvas.paste(p, (0, y))
        y += p.height
    image = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]
    return Result((image,), images=image)


def plot_node() -> NodeDef:
    return NodeDef(
        node_id="RFTPlotTraining", display_name="RFT Plot training", category="reward fine-tuning/train",
        description="Draws the training reward per step, the evaluation reward and the held-out rewards of a run.",
        inputs=[Input("log", TRAINING_LOG, "The training log of an RFT Train node.")],
        outputs=[Output("image", "IMAGE", "The curves as an image (save or preview it).")],
        run=_run_plot, output_node=True)
