"""Hub publishing against a fake Hub on loopback (tests/fake_hub.py): one commit with the LoRA, the samples and
a model card; token checked first and never leaked; 401/403/404/5xx/no network give clear errors."""

import hashlib
import json
import logging
import socket
import sys
import traceback

import pytest
import torch
import yaml
from fake_hub import FakeHub

from comfy_rft import hub as hub_module
from comfy_rft import lora
from comfy_rft.errors import UserError
from comfy_rft.hub import push_lora

TOKEN = "hf_" + "tOkEn7" * 6  # what the fake Hub accepts
WRONG = "hf_" + "wRoNg3" * 6
PROMPTS = "a red circle\na blue square"


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def sleeps(monkeypatch):
    waits = []
    monkeypatch.setattr(hub_module, "_sleep", waits.append)
    return waits


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, sleeps, caplog):
    from huggingface_hub import constants

    caplog.set_level(logging.DEBUG)
    for name in ("huggingface_hub", "comfy_rft", "httpx2", "httpcore2"):
        caplog.set_level(logging.DEBUG, logger=name)
    for handler in logging.getLogger("huggingface_hub").handlers:  # its own stderr handler: to this test's stderr
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", sys.stderr)
    with FakeHub(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(var, raising=False)
        # huggingface_hub read HF_ENDPOINT at import: its default points nowhere useful, so a request that
        # reaches the fake Hub proves comfy_rft read HF_ENDPOINT at call time.
        monkeypatch.setattr(constants, "ENDPOINT", _closed_port_url())
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_DEBUG", True)  # also log every request as a curl command
        yield server


def _write_lora(folder, name="draft_brightness.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    metadata = lora.lora_metadata(
        base_model="tiny-sd15", architecture="stable-diffusion-v1/lora", method="draft", reward="brightness",
        config={"method": "draft", "prompts": PROMPTS, "steps": 3, "lora_rank": 2}, rank=2, alpha=2.0,
        resolution=64, prediction_type="epsilon", title=name.split(".")[0])
    state = {"lora_unet_x_to_q.lora_down.weight": torch.randn(2, 8), "lora_unet_x_to_q.lora_up.weight": torch.randn(8, 2),
             "lora_unet_x_to_q.alpha": torch.tensor(2.0)}
    return lora.save_lora(folder / name, state, metadata)


def _write_png(path, color):
    from PIL import Image

    Image.new("RGB", (16, 8), color).save(path)
    return path


@pytest.fixture
def run_dir(tmp_path):
    """What a training run leaves: the LoRA, the before/after grid, the reward curve and summary.json."""
    out = tmp_path / "run"
    path = _write_lora(out)
    _write_png(out / "before_after.png", "red")
    _write_png(out / "reward_curve.png", "blue")
    (out / "summary.json").write_text(json.dumps({
        "method": "draft", "steps": 3, "reward_before": 0.25, "reward_after": 0.75, "lora": str(path),
        "seconds": 1.0, "out": str(out), "interrupted": False, "gold_reward_before": 0.5, "gold_reward_after": 0.625}))
    return out


def _digests(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def assert_token_only_in_auth_header(server, caplog, tmp_path, *texts, token=TOKEN):
    """The token is in every request's Authorization header and nowhere else we can see."""
    sent = [r for r in server.requests if r.endpoint != "unknown"]
    assert sent and all(r.headers.get("authorization") == f"Bearer {token}" for r in sent)
    for record in caplog.records:
        assert token not in record.getMessage() and token not in (record.exc_text or ""), record.getMessage()
    assert token not in caplog.text
    for request in server.requests:
        assert token.encode() not in request.body
        assert all(token not in v for k, v in request.headers.items() if k != "authorization")
    for commit in server.commits:
        assert all(token.encode() not in data for data in commit.files.values())
    assert all(token not in card for card in server.cards)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    for text in texts:
        assert token not in text


def _error_text(excinfo) -> str:
    return "".join(traceback.format_exception(excinfo.value))


# ---------------------------------------------------------------- the happy path


def test_push_creates_the_repo_and_one_commit_with_lora_card_and_samples(fake_hub, run_dir, tmp_path, caplog):
    before = _digests(tmp_path)
    lora_path = run_dir / "draft_brightness.safetensors"
    metrics = json.loads((run_dir / "summary.json").read_text())
    url = push_lora(lora_path, "alice/shapes", samples=[run_dir / "before_after.png"],
                    reward_curve=run_dir / "reward_curve.png", metrics=metrics, private=True)

    assert url == f"{fake_hub.url}/alice/shapes"
    assert [r.endpoint for r in fake_hub.requests if r.endpoint != "unknown"][:2] == ["whoami", "create"]
    create = json.loads(fake_hub.calls("create")[0].body)
    assert create["name"] == "shapes" and create["organization"] == "alice" and create["visibility"] == "private"
    assert fake_hub.repos["alice/shapes"].private
    assert len(fake_hub.commits) == 1 and len(fake_hub.calls("commit")) == 1
    commit = fake_hub.commits[0]
    assert commit.branch == "main" and "draft_brightness.safetensors" in commit.summary
    assert set(commit.files) == {"draft_brightness.safetensors", "README.md", "images/before_after.png",
                                 "images/reward_curve.png"}
    assert commit.files["draft_brightness.safetensors"] == lora_path.read_bytes()
    assert commit.files["images/before_after.png"] == (run_dir / "before_after.png").read_bytes()

    meta, body = _card(commit.files["README.md"].decode())
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # tiny-sd15 is no Hub repo
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"lora", "diffusers", "text-to-image", "reward-fine-tuning", "draft", "brightness"} <= set(meta["tags"])
    assert [w["output"]["url"] for w in meta["widget"]] == ["images/before_after.png"]
    assert "a red circle" in meta["widget"][0]["text"] and "before" in meta["widget"][0]["text"]
    assert "<Gallery />" in body and "tiny-sd15" in body
    assert "- a red circle" in body and "- a blue square" in body
    assert "| reward | 0.2500 | 0.7500 | +0.5000 |" in body  # reward before/after
    assert "| gold reward | 0.5000 | 0.6250 | +0.1250 |" in body  # held-out reward
    assert "![reward curve](images/reward_curve.png)" in body
    assert "ComfyUI/models/loras" in body and "LoraLoader" in body
    assert 'pipe.load_lora_weights("alice/shapes", weight_name="draft_brightness.safetensors")' in body
    assert '"lora_rank": 2' in body and '"method": "draft"' in body  # the training config, from the file
    assert "reward hacking" in body
    assert fake_hub.cards == [commit.files["README.md"].decode()]  # validated before the commit
    assert _digests(tmp_path) == before  # local files only read
    assert "curl -X POST" in caplog.text and "<TOKEN>" in caplog.text  # huggingface_hub's request logs were seen
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path, url)


def test_branch_is_created_and_an_existing_repo_is_reused(fake_hub, run_dir, tmp_path, caplog):
    lora_path = run_dir / "draft_brightness.safetensors"
    first = push_lora(lora_path, "shapes")  # a bare name goes under the token's owner
    second = push_lora(lora_path, "alice/shapes", revision="exp-1", base_model="my/base", license="mit")
    third = push_lora(lora_path, "alice/shapes", revision="exp-1")  # the branch exists now

    assert first == f"{fake_hub.url}/alice/shapes"
    assert second == third == f"{fake_hub.url}/alice/shapes/tree/exp-1"
    assert [r.status for r in fake_hub.calls("create")] == [200, 409, 409]
    assert [r.status for r in fake_hub.calls("branch")] == [200, 409]
    assert [(c.branch, len(c.files)) for c in fake_hub.commits] == [("main", 2), ("exp-1", 2), ("exp-1", 2)]
    assert fake_hub.calls("commit")[1].path.endswith("/commit/exp-1")
    meta, body = _card(fake_hub.commits[1].files["README.md"].decode())
    assert meta["base_model"] == "my/base" and meta["license"] == "mit" and "widget" not in meta
    assert 'weight_name="draft_brightness.safetensors", revision="exp-1")' in body
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path, first, second)


# ---------------------------------------------------------------- bad input, tokens


@pytest.mark.parametrize("repo", ["", "a/b/c", "alice/", "https://huggingface.co/alice/x", "-alice/x", "alice/x-",
                                  "alice/x y", "alice--x/y", "alice/x..y", "alice/x.git", "alice/" + "x" * 97])
def test_malformed_repo_id_fails_before_any_request(fake_hub, run_dir, repo):
    with pytest.raises(UserError, match="repo id"):
        push_lora(run_dir / "draft_brightness.safetensors", repo)
    assert fake_hub.requests == []


def test_bad_branch_name_and_missing_files_fail_before_any_request(fake_hub, run_dir, tmp_path):
    with pytest.raises(UserError, match="not a valid branch name"):
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x", revision="bad..branch")
    with pytest.raises(UserError, match="not found"):
        push_lora(tmp_path / "nope.safetensors", "alice/x")
    with pytest.raises(UserError, match="sample image .* not found"):
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x", samples=[tmp_path / "nope.png"])
    assert fake_hub.requests == []


def test_missing_token_is_a_clear_error_before_any_request(fake_hub, run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match="no Hugging Face token found.*HF_TOKEN.*hf auth login"):
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x")
    assert fake_hub.requests == []


def test_rejected_token_gives_the_token_error_and_uploads_nothing(fake_hub, run_dir, tmp_path, caplog, monkeypatch,
                                                                  sleeps):
    monkeypatch.setenv("HF_TOKEN", WRONG)
    with pytest.raises(UserError, match="rejected the token in HF_TOKEN \\(401") as excinfo:
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x")
    assert [r.endpoint for r in fake_hub.requests if r.endpoint != "unknown"] == ["whoami"]  # not retried either
    assert fake_hub.repos == {} and fake_hub.commits == [] and sleeps == []
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path, _error_text(excinfo), token=WRONG)


def test_read_only_token_is_refused_before_the_repo_is_created(fake_hub, run_dir):
    fake_hub.role = "read"
    with pytest.raises(UserError, match="read-only"):
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x")
    assert fake_hub.repos == {} and fake_hub.commits == []


def test_a_file_holding_the_token_is_never_uploaded(fake_hub, run_dir, tmp_path):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", json.dumps({"token": TOKEN}))  # as a careless ComfyUI workflow would embed it
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    Image.new("RGB", (4, 4)).save(leaky / "sample.png", pnginfo=info)
    with pytest.raises(UserError, match="contains your Hugging Face token") as excinfo:
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x", samples=[leaky / "sample.png"])
    assert TOKEN not in _error_text(excinfo)
    assert fake_hub.calls("commit") == [] and fake_hub.calls("create") == []

    # A token pasted into the prompts is redacted from the card, which is generated text.
    push_lora(run_dir / "draft_brightness.safetensors", "alice/x", config={"prompts": f"a cat {TOKEN}"})
    card = fake_hub.commits[-1].files["README.md"].decode()
    assert TOKEN not in card and "- a cat hf_***" in card


# ---------------------------------------------------------------- server failures


def test_5xx_is_retried_with_backoff_then_succeeds(fake_hub, run_dir, tmp_path, caplog, sleeps):
    fake_hub.fail("create", 502)
    fake_hub.fail("commit", 503, times=2)
    url = push_lora(run_dir / "draft_brightness.safetensors", "alice/flaky")
    assert url.endswith("/alice/flaky")
    assert [r.status for r in fake_hub.calls("create")] == [502, 200]
    assert [r.status for r in fake_hub.calls("commit")] == [503, 503, 200]
    assert len(fake_hub.commits) == 1
    assert sleeps == [hub_module.RETRY_WAITS[0], hub_module.RETRY_WAITS[0], hub_module.RETRY_WAITS[1]]
    assert "retrying" in caplog.text
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path, url)


def test_5xx_that_does_not_stop_gives_a_clear_error(fake_hub, run_dir, tmp_path, caplog, sleeps):
    before = _digests(tmp_path)
    fake_hub.fail("commit", 500, times=100)
    with pytest.raises(UserError, match="kept failing .*HTTP 500.*try again later") as excinfo:
        push_lora(run_dir / "draft_brightness.safetensors", "alice/down", retry_waits=(0.5, 0.5))
    assert "local files are untouched" in str(excinfo.value)
    assert len(fake_hub.calls("commit")) == 3 and sleeps == [0.5, 0.5] and fake_hub.commits == []
    assert _digests(tmp_path) == before
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path, _error_text(excinfo))


def test_403_is_a_clear_error_and_a_token_echoed_by_the_server_is_redacted(fake_hub, run_dir, tmp_path, caplog):
    with pytest.raises(UserError, match="403 Forbidden.*write access to the namespace 'bob'"):
        push_lora(run_dir / "draft_brightness.safetensors", "bob/x")  # not alice's namespace
    fake_hub.fail("create", 403, body={"error": f"token {TOKEN} may not write here"})
    with pytest.raises(UserError, match="403 Forbidden") as excinfo:
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x")
    assert "hf_***" in str(excinfo.value)
    assert fake_hub.commits == []
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path, _error_text(excinfo))


def test_404_is_a_clear_error(fake_hub, run_dir, tmp_path, caplog):
    fake_hub.fail("preupload", 404, body={"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
    with pytest.raises(UserError, match="alice/gone was not found .*404") as excinfo:
        push_lora(run_dir / "draft_brightness.safetensors", "alice/gone")
    assert fake_hub.commits == []
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path, _error_text(excinfo))


def test_no_network_is_a_clear_error(fake_hub, run_dir, tmp_path, monkeypatch, sleeps):
    before = _digests(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    with pytest.raises(UserError, match="cannot reach the Hub at http://127.0.0.1:") as excinfo:
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x")
    assert len(sleeps) == len(hub_module.RETRY_WAITS)
    assert TOKEN not in _error_text(excinfo)
    assert _digests(tmp_path) == before


def test_offline_mode_is_a_clear_error(fake_hub, run_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline mode.*HF_HUB_OFFLINE"):
        push_lora(run_dir / "draft_brightness.safetensors", "alice/x")


# ---------------------------------------------------------------- the faces: CLI and trainer


def test_cli_push_end_to_end(fake_hub, run_dir, tmp_path, caplog, capsys):
    from comfy_rft.cli import main

    lora_path = run_dir / "draft_brightness.safetensors"
    assert main(["push", str(lora_path), "--repo", "team/shapes", "--private", "--revision", "v1"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == f"{fake_hub.url}/team/shapes/tree/v1"
    commit = fake_hub.commits[-1]
    assert commit.branch == "v1" and fake_hub.repos["team/shapes"].private
    assert {"images/before_after.png", "images/reward_curve.png", "README.md"} < set(commit.files)
    _, body = _card(commit.files["README.md"].decode())
    assert "| reward | 0.2500 | 0.7500 | +0.5000 |" in body  # metrics from the run's summary.json

    samples = tmp_path / "samples"
    samples.mkdir()
    _write_png(samples / "cat_1.png", "green")
    _write_png(samples / "cat_2.jpg", "white")
    assert main(["push", str(lora_path), "--repo", "alice/shapes", "--samples", str(samples)]) == 0
    files = set(fake_hub.commits[-1].files)
    assert files == {"draft_brightness.safetensors", "README.md", "images/cat_1.png", "images/cat_2.jpg"}
    meta, _ = _card(fake_hub.commits[-1].files["README.md"].decode())
    assert [w["output"]["url"] for w in meta["widget"]] == ["images/cat_1.png", "images/cat_2.jpg"]

    assert main(["push", str(lora_path), "--repo", "not a repo"]) == 2
    err = capsys.readouterr().err
    assert "not a valid Hub repo id" in err and "Traceback" not in err
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path, out.out, out.err, err)


def test_train_with_push_to_hub_pushes_the_run(fake_hub, tmp_path, caplog):
    from comfy_rft.trainers.draft import DraftConfig, DraftMethod

    from comfy_rft.loop import train

    torch.set_num_threads(1)
    out = tmp_path / "run"
    config = DraftConfig(model="tiny-sd15", reward="brightness", prompts=PROMPTS, steps=1, sampling_steps=2,
                         batch_size=1, eval_samples=1, lora_rank=2, out=str(out), push_to_hub="alice/trained")
    result = train(DraftMethod, config, progress=False)

    assert result.hub_url == f"{fake_hub.url}/alice/trained"
    assert json.loads((out / "summary.json").read_text())["hub_url"] == result.hub_url
    commit = fake_hub.commits[-1]
    assert set(commit.files) == {"draft_brightness.safetensors", "README.md", "images/before_after.png",
                                 "images/reward_curve.png"}
    assert commit.files["draft_brightness.safetensors"] == (out / "draft_brightness.safetensors").read_bytes()
    meta, body = _card(commit.files["README.md"].decode())
    assert {"draft", "brightness"} <= set(meta["tags"])
    assert f"| reward | {result.reward_before:.4f} | {result.reward_after:.4f} |" in body
    _, metadata = lora.read_lora(out / "draft_brightness.safetensors")
    assert json.loads(metadata["comfy_rft.config"])["push_to_hub"] == "alice/trained"
    assert_token_only_in_auth_header(fake_hub, caplog, tmp_path)


def test_train_flag_push_to_hub_exists(capsys):
    from comfy_rft.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--push-to-hub" in capsys.readouterr().out
