"""Reward specs, combinators, JPEG, OCR, user callables, the robust gradient and the trainers' refusal."""

import json

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from comfy_rft.backend import DiffusersBackend
from comfy_rft.cli import main
from comfy_rft.errors import UserError
from comfy_rft.evaluation import evaluate
from comfy_rft.loop import train
from comfy_rft.seeding import derive_seed
from comfy_rft.rewards import load_reward, parse_spec
from comfy_rft.rewards.base import Reward
from comfy_rft.rewards.robust import RobustReward, sharpness
from comfy_rft.rewards.simple import Brightness
from comfy_rft.trainers.draft import DraftConfig, DraftMethod

PROMPTS = ["a", "b"]


def test_spec_parsing_keeps_plus_signs_inside_options():
    (a, h) = parse_spec("aesthetic(head=/m/sac+logos+ava1-l14-linearMSE.pth, target=6)@0.7 + hpsv2.1@0.3")
    assert (a.name, a.options, a.weight) == ("aesthetic", {"head": "/m/sac+logos+ava1-l14-linearMSE.pth", "target": "6"}, 0.7)
    assert (h.name, h.options, h.weight) == ("hpsv2.1", {}, 0.3)
    for bad in ["", "brightness@", "brightness(rho)", "+brightness"]:
        with pytest.raises(UserError):
            parse_spec(bad)


def test_weighted_sum_target_and_differentiability():
    images = torch.rand(2, 3, 16, 16)
    b = Brightness()(images, PROMPTS)
    combo = load_reward("brightness@0.5+jpeg@0.5")
    assert not combo.differentiable
    jpeg = load_reward("jpeg")(images, PROMPTS)
    torch.testing.assert_close(combo(images, PROMPTS), 0.5 * b + 0.5 * jpeg)
    torch.testing.assert_close(load_reward("brightness(target=0.25)")(images, PROMPTS), -(b - 0.25).abs())
    assert load_reward("brightness@2").differentiable


def test_per_prompt_normalisation_standardises_each_prompt():
    reward = load_reward("brightness(normalize=prompt)")
    reward.inner.min_count = 2
    for level in (0.2, 0.4, 0.6):
        out = reward(torch.full((2, 3, 4, 4), level), ["dark", "dark"])
    assert out.abs().max() < 1.5  # third sample of "dark": (0.6 - mean 0.4) / std 0.179
    torch.testing.assert_close(out, torch.full((2,), (0.6 - 0.4) / torch.tensor([0.2, 0.2, 0.4, 0.4, 0.6, 0.6]).std()))


def test_jpeg_prefers_flat_images_and_has_no_gradient():
    flat, noise = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    jpeg, busy = load_reward("jpeg"), load_reward("jpeg-incompressibility")
    assert jpeg(flat, ["x"]) > jpeg(noise, ["x"]) and busy(noise, ["x"]) > busy(flat, ["x"])
    assert not jpeg.differentiable


def _text_image(text, size=(192, 64)):
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((8, 10), text, fill="black", font=ImageFont.load_default(size=36))
    return torch.tensor(list(img.getdata()), dtype=torch.float32).view(size[1], size[0], 3).permute(2, 0, 1)[None] / 255


def test_ocr_reward_reads_the_quoted_text():
    pytest.importorskip("rapidocr_onnxruntime", reason='the OCR engine is the optional extra comfy-rft[ocr]')
    reward = load_reward("ocr")
    images = torch.cat([_text_image("OPEN"), _text_image("OPN"), torch.ones(1, 3, 64, 192)])
    scores = reward(images, ['a sign that says "open"'] * 3)
    assert scores[0] == 1.0 and 0.5 < scores[1] < 1.0 and scores[2] == 0.0
    with pytest.raises(UserError, match="no quoted text"):
        reward(images[:1], ["a sign"])


def test_user_callable_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def redness(images, prompts):\n    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))\n"
        "def wrong_shape(images, prompts):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("my_rewards:redness(differentiable=true)")
    assert reward.differentiable and not load_reward("my_rewards:redness").differentiable
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert reward(red, ["x"]).item() == 1.0
    with pytest.raises(UserError, match="one score per image"):
        load_reward("my_rewards:wrong_shape")(torch.zeros(2, 3, 8, 8), PROMPTS)
    with pytest.raises(UserError, match="cannot import module"):
        load_reward("no_such_module_xyz:f")


def test_unknown_reward_names_the_builtins():
    with pytest.raises(UserError, match="unknown reward 'nope'.*brightness"):
        load_reward("nope")


class Linear(Reward):
    """r(x) = <w, x>: its gradient is w everywhere, so the robust value is known exactly."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, images, prompts):
        return (images * self.w).flatten(1).sum(1)


def test_robust_reward_equals_plain_at_rho_zero_and_is_lower_above():
    w = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = Linear(w).freeze()
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(RobustReward(plain, rho=0.0)(images, PROMPTS), plain(images, PROMPTS))
    robust = RobustReward(plain, rho=0.1)(images, PROMPTS)
    torch.testing.assert_close(robust, plain(images, PROMPTS) - 0.1 * w.norm())  # δ = -ρ w/‖w‖
    assert (robust < plain(images, PROMPTS)).all()
    smooth = RobustReward(plain, rho=0.1, mode="smooth", samples=3)(images, PROMPTS)
    assert smooth.shape == (2,)
    torch.testing.assert_close(sharpness(plain, images, PROMPTS, rho=0.1), 0.1 * w.norm())


def test_robust_gradient_reaches_the_pixels_through_the_perturbed_point():
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    load_reward("brightness(rho=0.5)")(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


class Rippled(Reward):
    """A sharp synthetic reward: (b − 0.3)²·sin(100·u), b the brightness, u the red−blue balance.

    Its expected value does not depend on where the generator goes, but its gradient is steep
    except on the ripples' crests and troughs: plain training has no reason to seek the flat
    spots, a robust objective (≈ r − ρ‖∇r‖ to first order) does.
    """

    def forward(self, images, prompts):
        b = Brightness()(images, prompts)
        u = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
        return (b - 0.3) ** 2 * torch.sin(100 * u)


def test_robust_training_lowers_sharpness_against_plain_training(tmp_path):
    """RSA-FT's image-space claim on a sharp reward: the same DRaFT run, fed r(x + δ) instead of r(x),
    ends where the reward is flatter (S1 measured with the plain reward on 16 fresh samples)."""
    rho, prompts = 1.0, ["a red circle", "a blue square"]
    sharp = {}
    for label, wrap in (("plain", lambda r: r), ("robust", lambda r: RobustReward(r, rho=rho))):
        backend = DiffusersBackend.load("tiny-sd15", device="cpu")
        config = DraftConfig(prompts="\n".join(prompts), out=str(tmp_path / label), steps=30, k=2, sampling_steps=4,
                             guidance=3.0, lr=1e-2, batch_size=2, eval_samples=2)
        train(DraftMethod, config, backend=backend, reward=wrap(Rippled().freeze()), progress=False)
        images = evaluate(DraftMethod(config, backend, Rippled()), prompts, 16, derive_seed(0, "x"), 8).images
        sharp[label] = sharpness(Rippled(), images, prompts * 8, rho).item()
    assert sharp["robust"] < 0.5 * sharp["plain"], sharp


@pytest.mark.parametrize("spec", ["jpeg", "brightness@0.5+jpeg@0.5"])
def test_gradient_trainers_refuse_non_differentiable_rewards(tmp_path, capsys, spec):
    code = main(["train", "--method", "draft", "--model", "tiny-sd15", "--reward", spec, "--steps", "1",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is not differentiable" in err and "lasro" in err


def test_score_and_rewards_commands(tmp_path, capsys):
    for name, value in (("light.png", 220), ("dark.png", 20)):
        Image.new("RGB", (32, 32), (value,) * 3).save(tmp_path / name)
    assert main(["score", "--reward", "brightness", "--json", str(tmp_path / "light.png"), str(tmp_path / "dark.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["score"] == pytest.approx(220 / 255, abs=1e-4) and rows[1]["score"] < rows[0]["score"]
    assert main(["rewards"]) == 0
    listing = capsys.readouterr().out
    assert "brightness" in listing and "jpeg" in listing and "not differentiable" in listing
    assert main(["score", "--reward", "brightness", str(tmp_path / "missing.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
