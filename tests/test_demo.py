"""`comfy-rft demo`: the README's first command must train visibly and write what it promises."""

import json

from comfy_rft.cli import main
from comfy_rft.lora import read_lora


def test_demo_raises_the_reward_and_writes_a_loadable_lora(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "draft"
    assert summary["reward_after"] > summary["reward_before"] + 0.01, summary
    tensors, metadata = read_lora(summary["lora"])
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert all(m.startswith("lora_unet_") for m in modules)
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= tensors.keys()
    assert json.loads(metadata["comfy_rft.config"])["k"] == 2
    for name in ("before_after.png", "reward_curve.png", "metrics.jsonl", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
