"""The trainer node's logic around the engine loop, without ComfyUI: progress and previews per step, held-out
rewards at the loop's evaluations, samples reused between the loop and the node, Cancel, init_lora.

ComfyUI's progress bar and interrupt flag are replaced by small stand-ins; the model is the engine's
tiny SD1.5 pipeline (the ComfyUI MODEL adapter itself runs in tests/test_comfyui_integration.py).
"""

from __future__ import annotations

import sys
import types

import pytest

from comfy_rft import lora
from comfy_rft.loop import Method, train
from comfy_rft.nodes.payloads import LoraPayload, TrainingLog
from comfy_rft.nodes.train import Tracker, load_init_lora
from comfy_rft.rewards.simple import Brightness
from comfy_rft.trainers.draft import DraftConfig, DraftMethod


class Gold(Brightness):
    name = "gold"


@pytest.fixture
def comfy(monkeypatch):
    """Stand-ins for comfy.utils.ProgressBar and comfy.model_management's interrupt flag."""
    state = {"updates": [], "interrupt_after": None, "flag": False}

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            if state["flag"]:
                raise InterruptProcessingException()
            state["updates"].append((value, total, preview))

    class InterruptProcessingException(Exception):
        pass

    def processing_interrupted():
        return state["flag"]

    def interrupt_current_processing(value=True):
        state["flag"] = value

    package = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.processing_interrupted = processing_interrupted
    mm.interrupt_current_processing = interrupt_current_processing
    mm.InterruptProcessingException = InterruptProcessingException
    package.utils, package.model_management = utils, mm
    for name, module in (("comfy", package), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, module)
    return state


@pytest.fixture
def backend(sd15):
    sd15.family = "sd1-diffusers-names"  # the diffusers UNet already has diffusers names: nothing to rename
    sd15.cancelled = False
    sd15.lora_layer_paths = lambda adapter="default": [p for p, _ in lora._lora_layers(sd15.denoiser, adapter)]
    return sd15


def _config(tmp_path, **overrides):
    values = dict(model="tiny-sd15", reward="brightness", prompts="a red apple\na blue sky", steps=3, sampling_steps=2,
                  batch_size=1, eval_samples=1, eval_every=2, checkpoint_every=0, lr=0.05, out=str(tmp_path / "run"),
                  device="cpu")
    values.update(overrides)
    return DraftConfig(**values)


def _tracker(config, backend, **overrides):
    prompts = config.prompts.split("\n")
    kwargs = dict(key="draft", config=config, backend=backend, prompts=prompts, eval_prompts=prompts,
                  eval_rewards=[Gold().freeze()], preview_every=1, init_lora=None,
                  training_log=TrainingLog(method="draft", reward="brightness", config=config.to_dict()))
    kwargs.update(overrides)
    return Tracker(**kwargs)


def test_progress_previews_and_held_out_rewards_reuse_the_loops_samples(comfy, backend, tmp_path, monkeypatch):
    calls = []
    original = Method.generate

    def counting(self, prompts, seed):
        calls.append((tuple(prompts), seed))
        return original(self, prompts, seed)

    monkeypatch.setattr(Method, "generate", counting)
    config = _config(tmp_path)
    tracker = _tracker(config, backend)
    result = train(tracker.method_class(DraftMethod), config, backend=backend, reward=Brightness().freeze(),
                   on_step=tracker.on_step, progress=False)

    assert result.steps == 3 and not tracker.cancelled
    assert [u[0] for u in comfy["updates"]] == [0, 1, 2, 3]  # the start, then every step
    assert all(u[1] == 3 and u[2][0] == "JPEG" and u[2][1].size == (64, 64) for u in comfy["updates"])
    log = tracker.log
    assert [e["step"] for e in log.evaluations] == [0, 2, 3]  # the loop's evaluations (eval_every=2) and the end
    assert all(set(e["heldout"]) == {"gold"} for e in log.evaluations)
    # the held-out reward equals the training reward here, on the very images the loop scored
    assert [e["heldout"]["gold"] for e in log.evaluations] == pytest.approx([e["reward"] for e in log.evaluations])
    assert log.evaluations[0]["reward"] == pytest.approx(result.reward_before)
    assert log.evaluations[-1]["reward"] == pytest.approx(result.reward_after)
    assert [row["step"] for row in log.history] == [1, 2, 3]
    # one sampling per LoRA state: step 0 (shared with the loop's "before"), the step-1 preview, step 2 (the
    # loop's evaluation, reused), step 3 (ours, reused by the loop's "after")
    assert len(calls) == 4, calls


def test_cancel_stops_after_the_step_and_the_loop_keeps_a_checkpoint(comfy, backend, tmp_path):
    config = _config(tmp_path, steps=5, eval_every=0)
    tracker = _tracker(config, backend)

    def on_step(row):
        if row["step"] == 2:
            comfy["flag"] = True  # the Cancel button, pressed during step 2
        return tracker.on_step(row)

    result = train(tracker.method_class(DraftMethod), config, backend=backend, reward=Brightness().freeze(),
                   on_step=on_step, progress=False)
    assert tracker.cancelled and backend.cancelled and result.interrupted
    assert result.steps == 2 and tracker.steps_done == 2
    assert comfy["flag"] is False  # cleared, so a second Cancel can abort the closing evaluation
    assert (tmp_path / "run" / "checkpoints" / "step-0000002.pt").is_file()
    assert [u[0] for u in comfy["updates"]] == [0, 1]  # no progress update once cancelled


def test_init_lora_starts_from_a_files_weights(comfy, backend, tmp_path):
    config = _config(tmp_path, steps=1, eval_every=0)
    first = _tracker(config, backend)
    train(first.method_class(DraftMethod), config, backend=backend, reward=Brightness().freeze(),
          on_step=first.on_step, progress=False)
    trained = lora.lora_state_dict(backend.denoiser)
    backend.denoiser.delete_adapters("default")

    payload = LoraPayload(trained, {})
    second_config = _config(tmp_path, steps=1, eval_every=0, out=str(tmp_path / "second"))  # same eval seed
    second = _tracker(second_config, backend, init_lora=payload)
    train(second.method_class(DraftMethod), second_config, backend=backend, reward=Brightness().freeze(),
          on_step=second.on_step, progress=False)
    assert second.log.evaluations[0]["reward"] == pytest.approx(first.log.evaluations[-1]["reward"], rel=1e-5)

    from comfy_rft.errors import UserError

    backend.denoiser.delete_adapters("default")
    lora.inject_lora(backend.denoiser, 4, 4.0)
    with pytest.raises(UserError, match="rank 8 and alpha 8; set lora_rank=8"):
        load_init_lora(backend, payload, _config(tmp_path, lora_rank=4, lora_alpha=4.0))
    bad = {k: v for k, v in trained.items() if "attn1_to_q" not in k}
    with pytest.raises(UserError, match="targets other layers"):
        load_init_lora(backend, LoraPayload(bad, {}), _config(tmp_path, lora_rank=4, lora_alpha=4.0))
