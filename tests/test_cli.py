"""The command line contract: the JSON line, the TOML config and clear errors for bad input."""

import json

import pytest
import torch

from comfy_rft.cli import main

FAST = ["--sampling-steps", "2", "--batch-size", "1", "--eval-samples", "1", "--lora-rank", "2"]


def _last_json(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_train_prints_the_summary_json_as_last_line(tmp_path, capsys):
    try:  # --threads reaches torch (the suite runs on 1 thread, so ask for 2 and restore)
        code = main(["train", "--method", "draft", "--model", "tiny-sd15", "--reward", "brightness", "--threads", "2",
                     "--prompts", "a red circle", "--steps", "2", "--seed", "3", "--out", str(tmp_path), *FAST])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert code == 0
    summary = _last_json(capsys)
    assert {"method", "steps", "reward_before", "reward_after", "lora", "seconds"} <= summary.keys()
    assert summary["method"] == "draft" and summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    for name in ("reward_curve.png", "before_after.png", summary["lora"]):
        assert (tmp_path / name).exists()


def test_toml_config_is_read_and_flags_override_it(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'method = "draft"\nsteps = 5\nprompts = "a cat"\nout = "{tmp_path}"\nsampling_steps = 2\n'
                      f'batch_size = 1\neval_samples = 1\nlora_rank = 2\n')
    assert main(["train", "--config", str(config), "--steps", "1"]) == 0
    assert _last_json(capsys)["steps"] == 1


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "not found"),
    (["--model", "{tmp}"], "not a diffusers model folder"),
    (["--model", "{tmp}/garbage.safetensors"], "is not a readable model checkpoint"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--k", "5", "--sampling-steps", "3"], "K=5 is larger than the number of sampling steps"),
    (["--prompts", "{tmp}/empty.txt"], "no prompts"),
    (["--reward", "no-such-reward"], "unknown reward 'no-such-reward'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--k", "2", "--lv-samples", "2"], "needs K=1"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bad_input_gives_a_clear_error(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint at all")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["train", "--steps", "1", "--out", str(tmp_path / "out"), *FAST[:2], *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
