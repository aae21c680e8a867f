"""RSA-FT: the SAM update against a hand-written reference, exact reduction to the base, the ablations."""

import json

import pytest
import torch

from comfy_rft.backend import DiffusersBackend
from comfy_rft.cli import main
from comfy_rft.loop import add_run_lora
from comfy_rft.lora import lora_state_dict, read_lora
from comfy_rft.rewards import load_reward
from comfy_rft.rewards.base import Reward
from comfy_rft.rewards.robust import RobustReward, sharpness
from comfy_rft.trainers.draft import DraftMethod
from comfy_rft.trainers.rsaft import RsaftConfig, RsaftMethod

PROMPTS = ["a red circle", "a blue square"]
SMALL = dict(sampling_steps=4, guidance=3.0, batch_size=2, lora_rank=4, lora_alpha=4.0, k=2, refl_window=2, prompts="x")


def _method(cls=RsaftMethod, config_cls=RsaftConfig, reward=None, **options):
    config = config_cls(**{**SMALL, **options})
    backend = DiffusersBackend.load("tiny-sd15", device="cpu")
    method = cls(config, backend, reward or load_reward("brightness"))
    method.params = add_run_lora(backend.denoiser, config)
    with torch.no_grad():  # a non-zero adapter, so every path through it carries gradient
        for p in method.params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return method


def _step_gradient(method, seed=3):
    for p in method.params:
        p.grad = None
    method.loss(PROMPTS, seed).loss.backward()
    method.after_backward()
    return [p.grad.clone() for p in method.params]


def test_sam_update_equals_a_hand_written_reference():
    method = _method(rho=0.05, rho_param=0.05)
    params, theta = method.params, [p.detach().clone() for p in method.params]
    reward = method.reward
    # The reference: perturb, recompute, restore, step, written out from the paper's equations.
    images, prompts, _ = method.rollout(PROMPTS, 3)
    grads = torch.autograd.grad(reward(images, prompts).sum(), [images, *params])
    g_img, g_theta = grads[0], grads[1:]
    delta = -0.05 * g_img / g_img.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_theta))
    with torch.no_grad():
        for p, g in zip(params, g_theta):
            p.sub_(0.05 * g / norm)
    images_p, _, _ = method.rollout(PROMPTS, 3)
    expected = torch.autograd.grad(-reward(images_p + delta, prompts).mean(), params)
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    reference_opt = torch.optim.AdamW(params, lr=1e-3)
    for p, g in zip(params, expected):
        p.grad = g.clone()
    reference_opt.step()
    reference_after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)

    got = _step_gradient(method)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(p, t) for p, t in zip(params, theta)), "the adapter drifted: θ not restored exactly"
    torch.optim.AdamW(params, lr=1e-3).step()
    for p, r in zip(params, reference_after):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=0)


def test_shared_prefix_sam_equals_a_hand_written_reference(monkeypatch):
    """--sam-rollout shared-prefix: the steps without gradient run once at θ, only the K=2 last re-run at θ + ε."""
    method = _method(rho=0.05, rho_param=0.05, sam_rollout="shared-prefix", eta=1.0)
    params, theta, reward, backend = method.params, [p.detach().clone() for p in method.params], method.reward, \
        method.backend
    images, prompts, _ = method.rollout(PROMPTS, 3)
    grads = torch.autograd.grad(reward(images, prompts).sum(), [images, *params])
    delta = -0.05 * grads[0] / grads[0].flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads[1:]))
    # The reference: DDIM by hand, steps 0-1 without gradient at θ, then θ + ε for steps 2-3 only.
    cond, noise, schedule = backend.encode(PROMPTS, 64, 64), method.noise(2, 3), backend.schedule
    timesteps = schedule.timesteps(4)
    x = noise.initial
    for i, t in enumerate(timesteps):
        if i == 2:
            x = x.detach()
            with torch.no_grad():
                for p, g in zip(params, grads[1:]):
                    p.sub_(0.05 * g / norm)
        with torch.set_grad_enabled(i >= 2):
            step = schedule.step_distribution(backend.predict(x, t, cond, 3.0), x, t, schedule.previous(t, 4), 1.0)
            x = step.mean + step.std * noise.steps[i]
    expected = torch.autograd.grad(-reward(backend.decode(x) + delta, prompts).mean(), params)
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)

    calls = []
    predict = backend.predict
    monkeypatch.setattr(backend, "predict", lambda *a, **k: calls.append(torch.is_grad_enabled()) or predict(*a, **k))
    got = _step_gradient(method)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(p, t) for p, t in zip(params, theta)), "the adapter drifted: θ not restored exactly"
    assert calls.count(False) == 2, "the two steps without gradient ran again at θ + ε"
    monkeypatch.undo()
    full = _step_gradient(_method(rho=0.05, rho_param=0.05, sam_rollout="full", eta=1.0))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(full, got)), "the mode made no difference"


@pytest.mark.parametrize("sam_rollout", ["full", "shared-prefix"])
@pytest.mark.parametrize("base", ["draft-k", "draft-lv", "refl", "alignprop"])
def test_zero_radii_give_exactly_the_base_update(base, sam_rollout):
    plain = _step_gradient(_method(DraftMethod, RsaftConfig, base=base))
    zero = _step_gradient(_method(base=base, rho=0.0, rho_param=0.0, sam_rollout=sam_rollout))
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert sum(g.abs().sum() for g in plain) > 0


def test_both_rollouts_replay_the_same_noises(monkeypatch):
    method = _method()
    seen = []
    original = method.noise
    monkeypatch.setattr(method, "noise", lambda batch, seed: seen.append(original(batch, seed)) or seen[-1])
    _step_gradient(method)
    assert len(seen) == 2
    assert torch.equal(seen[0].initial, seen[1].initial)
    assert all(torch.equal(a, b) for a, b in zip(seen[0].steps, seen[1].steps))


class PixelEnergy(Reward):
    """Non-linear with an image-dependent gradient direction, so δ at θ and at θ + ε differ and r(x + δ)
    has another gradient than r(x) (with a linear reward both would be the same)."""

    def forward(self, images, prompts):
        return 10 * (images - 0.3).pow(2).mean(dim=(1, 2, 3))


def test_ablation_switches():
    def run(cls=RsaftMethod, reward=None, **options):
        return _step_gradient(_method(cls, reward=reward or PixelEnergy().freeze(), **options))

    base = run(DraftMethod)
    image_only = run(param_perturbation=False, rho=0.5)
    # image-only RSA-FT is DRaFT on the robust reward r(x + δ)
    robust_draft = run(DraftMethod, reward=RobustReward(PixelEnergy().freeze(), rho=0.5))
    for a, b in zip(image_only, robust_draft):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    param_only = run(image_perturbation=False, rho_param=0.5)
    assert all(torch.equal(a, b) for a, b in zip(run(image_perturbation=False, param_perturbation=False), base))
    differs = lambda x, y: any(not torch.allclose(a, b, atol=1e-9) for a, b in zip(x, y))  # noqa: E731
    assert differs(param_only, base) and differs(image_only, base) and differs(param_only, image_only)
    both = run(rho=0.5, rho_param=0.5)
    assert differs(run(rho=0.5, rho_param=0.5, rho_param_scale="relative"), both)
    assert differs(run(rho=0.5, rho_param=0.5, delta_at="perturbed"), both)


@pytest.mark.parametrize("param_perturbation", [True, False])
def test_logged_metrics(param_perturbation):
    method = _method(reward=PixelEnergy().freeze(), rho=0.5, param_perturbation=param_perturbation)
    output = method.loss(PROMPTS, 1)
    method.after_backward()
    assert {"proxy_reward", "robust_reward", "sharpness_s1"} <= output.metrics.keys()
    assert ("grad_norm_theta" in output.metrics) == param_perturbation
    assert output.metrics["robust_reward"] < output.metrics["proxy_reward"]
    images, prompts, _ = method.rollout(PROMPTS, 1)  # S1 is Eq. 10 on the images at θ, whichever path scored it
    assert output.metrics["sharpness_s1"] == pytest.approx(sharpness(method.reward, images, prompts, 0.5).item(),
                                                           rel=1e-4)
    assert output.metrics["sharpness_s1"] > 0


def test_rsaft_cli_raises_the_reward_and_changes_every_lora_parameter(tmp_path, capsys):
    args = ["train", "--method", "rsaft", "--model", "tiny-sd15", "--reward", "brightness", "--steps", "20",
            "--seed", "0", "--out", str(tmp_path), "--prompts", "a red circle\na blue square", "--lr", "1e-2",
            "--sampling-steps", "4", "--k", "2", "--guidance", "3", "--batch-size", "2", "--eval-samples", "4",
            "--resolution", "128"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "rsaft" and summary["reward_after"] > summary["reward_before"] + 0.005, summary
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"proxy_reward", "robust_reward", "sharpness_s1", "grad_norm_theta"} <= rows[1].keys()
    initial = DiffusersBackend.load("tiny-sd15", device="cpu")
    add_run_lora(initial.denoiser, RsaftConfig(seed=0))  # the same seeded init as the run's
    start, (trained, _) = lora_state_dict(initial.denoiser), read_lora(summary["lora"])
    assert start.keys() == trained.keys()
    unchanged = [k for k in start if not k.endswith(".alpha") and torch.equal(start[k], trained[k])]
    assert not unchanged, unchanged
