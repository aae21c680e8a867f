"""The loop for real runs: exact resume, crash-safe checkpoints, accumulation and data parallelism, evaluation rows."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from comfy_rft.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint
from comfy_rft.errors import UserError
from comfy_rft.loop import train
from comfy_rft.lora import read_lora
from comfy_rft.trainers import METHODS

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(sampling_steps=3, guidance=3.0, batch_size=2, eval_samples=2, lr=1e-2, lora_rank=2, lora_alpha=2.0,
            prompts="a red circle\na blue square\na green star", k=2)


def _config(method, out, **options):
    config_cls, _ = METHODS[method]
    return config_cls(out=str(out), **{**FAST, **options})


def _lora(result):
    return read_lora(result.lora)[0]


def _assert_same_lora(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["draft", "rsaft"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, method):
    _, method_cls = METHODS[method]
    whole = train(method_cls, _config(method, tmp_path / "whole", steps=4, checkpoint_every=2), progress=False)

    def crash_after_step_3(row):
        if row["step"] == 3:  # the checkpoint of step 2 exists; step 3's work is lost
            raise Crash

    crashed = _config(method, tmp_path / "crashed", steps=4, checkpoint_every=2)
    with pytest.raises(Crash):
        train(method_cls, crashed, on_step=crash_after_step_3, progress=False)
    assert [p.name for p in list_checkpoints(crashed.out)] == ["step-0000002.pt"]
    resumed = train(method_cls, _config(method, tmp_path / "crashed", steps=4, checkpoint_every=2, resume="latest"),
                    progress=False)
    _assert_same_lora(_lora(resumed), _lora(whole), atol=1e-6)
    assert resumed.reward_before == whole.reward_before
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # the lost step 3 was dropped and redone, not duplicated


def test_cancel_keeps_a_checkpoint_and_resume_continues(tmp_path):
    _, method_cls = METHODS["draft"]
    stopped = train(method_cls, _config("draft", tmp_path, steps=5, checkpoint_every=0), progress=False,
                    on_step=lambda row: row["step"] == 2)
    assert stopped.interrupted and stopped.steps == 2
    assert find_checkpoint(tmp_path, "latest").name == "step-0000002.pt"
    resumed = train(method_cls, _config("draft", tmp_path, steps=5, checkpoint_every=0, resume="latest"), progress=False)
    assert resumed.steps == 5 and not resumed.interrupted


def test_resume_with_other_options_is_refused(tmp_path):
    _, method_cls = METHODS["draft"]
    train(method_cls, _config("draft", tmp_path, steps=1), progress=False)
    with pytest.raises(UserError, match="other options.*lr"):
        train(method_cls, _config("draft", tmp_path, steps=2, lr=5e-3, resume="latest"), progress=False)
    with pytest.raises(UserError, match="no checkpoint"):
        train(method_cls, _config("draft", tmp_path / "empty", steps=2, resume="latest"), progress=False)


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        import comfy_rft.checkpoint as ckpt
        from comfy_rft.loop import train
        from comfy_rft.trainers.draft import DraftConfig, DraftMethod
        real_save, calls = torch.save, []
        def dying_save(obj, f):
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint: write half of it, then die like a power cut
                import io
                buffer = io.BytesIO()
                real_save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, f)
        ckpt.torch.save = dying_save
        config = DraftConfig(out={str(tmp_path)!r}, steps=3, checkpoint_every=1, **{FAST!r})
        train(DraftMethod, config, progress=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001.pt"]
    assert list((tmp_path / "checkpoints").glob(".step-0000002.pt.*.tmp"))  # the torn write, never renamed
    latest = find_checkpoint(tmp_path, "latest")
    assert len(load_checkpoint(latest)["history"]) == 1
    _, method_cls = METHODS["draft"]
    resumed = train(method_cls, _config("draft", tmp_path, steps=3, checkpoint_every=1, resume="latest"),
                    progress=False)
    assert resumed.steps == 3
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


GRADIENT_SCRIPT = textwrap.dedent(f"""
    import sys, torch
    torch.set_num_threads(1)
    from comfy_rft.backend import DiffusersBackend
    from comfy_rft.distributed import Processes
    from comfy_rft.loop import add_run_lora, step_gradients
    from comfy_rft.rewards import load_reward
    from comfy_rft.trainers.draft import DraftConfig, DraftMethod

    def gradient(batch_size, grad_accum, procs):
        config = DraftConfig(**{{**{FAST!r}, "batch_size": batch_size, "grad_accum": grad_accum}})
        method = DraftMethod(config, DiffusersBackend.load("tiny-sd15", device="cpu"), load_reward("brightness"))
        method.params = add_run_lora(method.backend.denoiser, config)
        step_gradients(method, ["a red circle", "a green star"], 1234, procs)
        return torch.cat([p.grad.flatten() for p in method.params])

    if __name__ == "__main__":
        procs = Processes.from_environment()
        grad = gradient(1, 1, procs)
        if procs.is_main:
            torch.save(grad, sys.argv[1])
""")


def _relative_difference(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_gradient_accumulation_gives_the_gradient_of_the_bigger_batch(tmp_path):
    namespace = {}
    exec(compile(GRADIENT_SCRIPT, "gradient", "exec"), namespace)
    from comfy_rft.distributed import Processes

    big = namespace["gradient"](2, 1, Processes())
    accumulated = namespace["gradient"](1, 2, Processes())
    assert big.abs().max() > 0
    assert _relative_difference(accumulated, big) < 1e-5


def test_two_processes_give_the_gradient_of_one_process_with_twice_the_batch(tmp_path):
    script = tmp_path / "gradient.py"
    script.write_text(GRADIENT_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(script), str(tmp_path / "ddp.pt")]
    done = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    namespace = {}
    exec(compile(GRADIENT_SCRIPT, "gradient", "exec"), namespace)
    from comfy_rft.distributed import Processes

    single = namespace["gradient"](2, 1, Processes())
    assert _relative_difference(torch.load(tmp_path / "ddp.pt"), single) < 1e-5


def test_a_two_process_run_trains_and_rank_0_writes_the_files(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from comfy_rft.loop import train
        from comfy_rft.trainers.draft import DraftConfig, DraftMethod
        options = {{**{FAST!r}, "batch_size": int(sys.argv[2])}}
        train(DraftMethod, DraftConfig(out=sys.argv[1], steps=2, **options), progress=False)
    """))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(script), str(tmp_path / "ddp"), "1"]
    done = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(list((tmp_path / "ddp").glob("*.safetensors"))) == 1
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "train"] for name in ("ddp", "single")}
    # The first step's rewards come from the same samples (gathered from both processes).
    assert rows["ddp"][0]["reward_mean"] == pytest.approx(rows["single"][0]["reward_mean"], abs=1e-6)
    assert len(rows["ddp"]) == 2


def test_metrics_hold_evaluation_rows_with_held_out_rewards_and_diversity(tmp_path):
    _, method_cls = METHODS["draft"]
    train(method_cls, _config("draft", tmp_path, steps=2, eval_every=1, eval_rewards="jpeg, brightness(target=0.9)",
                              eval_samples=4, prompts="a red circle\na blue square"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2, 2]  # before, every step, after
    for r in evals:
        assert isinstance(r["eval_jpeg"], float) and isinstance(r["eval_brightness(target=0.9)"], float)
        assert r["diversity"] > 0
    assert (tmp_path / "eval" / "step-0000001.png").exists()


def test_bf16_autocast_trains_with_fp32_lora_weights(tmp_path):
    _, method_cls = METHODS["draft"]
    result = train(method_cls, _config("draft", tmp_path, steps=2, mixed_precision="bf16"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["grad_norm"] < float("inf") for r in rows if r["kind"] == "train")
    assert all(t.dtype == torch.float32 for t in _lora(result).values())
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        train(method_cls, _config("draft", tmp_path / "fp16", steps=1, mixed_precision="fp16", device="cpu"),
              progress=False)
