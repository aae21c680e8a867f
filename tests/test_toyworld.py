"""The toy world: its committed model follows captions, its rewards measure what they claim, and the
evidence benchmark's fast mode shows DRaFT raising the proxy while the gold measures stay independent."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_rft.backend import DiffusersBackend
from comfy_rft.errors import UserError
from comfy_rft.rewards import load_reward
from comfy_rft.sampler import SamplerNoise, sample
from comfy_rft.toyworld import TOY_MODEL, classifier_file, shapes
from comfy_rft.toyworld.classifier import caption_hits

ROOT = Path(__file__).resolve().parent.parent


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def renders():
    generator = torch.Generator().manual_seed(123)
    attributes = shapes.random_attributes(96, generator)
    prompts = [shapes.caption(shapes.COLOUR_NAMES[c], shapes.SHAPES[s], shapes.COLOUR_NAMES[b])
               for s, c, b in attributes.tolist()]
    return shapes.render(attributes, generator), prompts


def _wrong_captions(prompts):
    """Each caption with its shape swapped for the next one."""
    out = []
    for p in prompts:
        s, c, b = shapes.parse_caption(p)
        out.append(shapes.caption(shapes.COLOUR_NAMES[c], shapes.SHAPES[(s + 1) % 3], shapes.COLOUR_NAMES[b]))
    return out


def test_the_program_reads_every_rendered_attribute_and_size():
    generator = torch.Generator().manual_seed(123)
    attributes = shapes.random_attributes(96, generator)
    images, sizes = shapes.render_sized(attributes, generator)
    read, read_sizes = shapes.read_attributes(images)
    assert torch.equal(read, attributes)
    error = (read_sizes - sizes).abs()
    assert error.mean() < 0.05 and error.max() < 0.15  # 0.2 px and 0.6 px of radius


def test_the_check_scores_matches_and_size(renders):
    images, prompts = renders
    match, size = shapes.check(images, shapes.labels(prompts))
    assert (match == 1).all() and (shapes.check(images, shapes.labels(_wrong_captions(prompts)))[0] == 2 / 3).all()
    assert ((0 <= size) & (size <= 1)).all()


def test_the_tokenizer_has_one_token_per_word():
    backend = DiffusersBackend.load(TOY_MODEL, device="cpu")
    tokenizer = backend.pipe.tokenizer
    for word in ("a", "on", "background", *shapes.COLOUR_NAMES, *shapes.SHAPES):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


# The proxy is weak on purpose (240 training images, no augmentation: it half-knows shapes).
@pytest.mark.parametrize("spec, agreement", [("toy-proxy", 0.6), ("toy-gold", 0.95), ("toy-check", 1.0)])
def test_each_toy_reward_prefers_the_right_caption(renders, spec, agreement):
    images, prompts = renders
    reward = load_reward(spec)
    right, wrong = reward(images, prompts), reward(images, _wrong_captions(prompts))
    assert right.shape == (len(prompts),)
    if spec != "toy-proxy":  # the proxy's size regression is not clamped: it extrapolates, and can be hacked
        assert 0 <= right.min() and right.max() <= 1
    assert (right > wrong).float().mean() >= agreement


def test_proxy_and_gold_give_gradients_and_the_program_does_not(renders):
    images, prompts = renders
    assert not load_reward("toy-check").differentiable
    for spec in ("toy-proxy", "toy-gold"):
        pixels = images[:4].clone().requires_grad_(True)
        load_reward(spec)(pixels, prompts[:4]).sum().backward()
        assert pixels.grad.abs().sum() > 0


def test_gold_is_independent_of_the_proxy():
    proxy, gold = load_file(str(classifier_file("proxy"))), load_file(str(classifier_file("gold")))
    assert len(gold) == 5 * len(proxy)  # five members against one
    proxy_weights = {tuple(t.flatten()[:8].tolist()) for t in proxy.values()}
    assert not proxy_weights & {tuple(t.flatten()[:8].tolist()) for t in gold.values()}


def test_a_caption_outside_the_world_is_refused_clearly(renders):
    images, _ = renders
    with pytest.raises(UserError, match="not a toy-world caption.*colours red, green, blue, yellow"):
        load_reward("toy-proxy")(images[:1], ["a photo of a cat"])


def test_the_base_model_follows_its_captions():
    """Gold and the program agree the samples match their captions far above chance (1/36)."""
    backend = DiffusersBackend.load(TOY_MODEL, device="cpu")
    prompts = shapes.all_captions()
    noise = SamplerNoise.from_seed(5, backend.latent_shape(len(prompts)), 10)
    with torch.no_grad():
        images = backend.decode(sample(backend, backend.encode(prompts), noise, num_steps=10, guidance=3.0).latents)
    assert images.shape == (36, 3, 32, 32)
    gold = load_reward("toy-gold")
    assert caption_hits(gold.ensemble, images, shapes.labels(prompts)).float().mean() > 0.8
    assert shapes.check(images, shapes.labels(prompts))[0].mean() > 0.8


def test_evidence_fast_mode_draft_raises_the_proxy(tmp_path):
    evidence = _bench_module("evidence")
    results = evidence.run(tmp_path, seeds=[0], steps=12, arms=evidence.FAST_ARMS)
    base, (trained,) = results["base"], results["arms"]["DRaFT-1"]
    assert trained["proxy"] > base["proxy"] + 0.01, (base, trained)
    assert trained["reward_queries"] == 12 * evidence.SHARED["batch_size"]
    assert "| DRaFT-1 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "evidence.png").stat().st_size > 0
