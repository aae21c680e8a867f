"""Time and memory of one DRaFT optimiser step: the library's real step next to a bare hand loop,
RSA-FT's step next to the base step it wraps, SQDF's rollout epoch and update, and LaSRO's
generator step and surrogate round.

For K (steps with gradient) in {1, 2, all} x T (DDIM steps) x gradient checkpointing on/off, one run
measures the step `comfy_rft.loop.train` takes (DraftMethod.loss -> backward -> clip -> AdamW) and the
same step written by hand against diffusers/peft/torch. The two are measured back to back per config,
so library time / hand time is the library's overhead and machine drift hits both alike. The printed
markdown table is what bench/README.md shows; its columns are explained there. A second table
times RSA-FT (both perturbations; full and shared-prefix rollout at θ + ε) against each base it wraps
(DRaFT-1, DRaFT-2, DRaFT-LV, ReFL, AlignProp), interleaved the same way; a third times
SQDF's rollout epoch and update per T, with their peak memory; a fourth times LaSRO's two parts
separately: one generator step and one surrogate round (exploration, true-reward queries,
Bradley-Terry steps).

    python bench/step_cost.py [--device cpu|cuda] [--repeats N] [--steps 10,25,50]
                              [--model tiny-sd15|DIR] [--resolution PX] [--threads N] [--json OUT]
                              [--only draft|rsaft|sqdf|lasro]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import json
import statistics
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from comfy_rft import lora
from comfy_rft.backend import DiffusersBackend
from comfy_rft.distributed import Processes
from comfy_rft.loop import step_gradients
from comfy_rft.rewards import load_reward
from comfy_rft.trainers.draft import DraftConfig, DraftMethod
from comfy_rft.trainers.lasro import LasroConfig, LasroMethod
from comfy_rft.trainers.rsaft import RsaftConfig, RsaftMethod
from comfy_rft.trainers.sqdf import SqdfConfig, SqdfMethod

PROMPTS = ["a photo of a cat", "a red circle"]  # batch 2
GUIDANCE = 7.5
RANK = ALPHA = 8
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 4e-4, 0.1, 1.0  # the library's defaults, given to both implementations
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # lora.DEFAULT_TARGETS, spelled out for the hand loop
MiB = 2**20


class LibraryStep:
    """One optimiser step as `comfy_rft.loop.train` takes it (one micro-batch), through a method's loss."""

    def __init__(self, backend, reward, params, optimizer, steps: int, k: int, ckpt: bool, size: int,
                 method=(DraftConfig, DraftMethod), options: dict | None = None):
        config_cls, method_cls = method
        self.config = config_cls(**{**dict(sampling_steps=steps, k=k, grad_checkpointing=ckpt, batch_size=len(PROMPTS),
                                           guidance=GUIDANCE, resolution=size, max_grad_norm=MAX_GRAD_NORM),
                                    **(options or {})})
        self.method = method_cls(self.config, backend, reward)
        self.method.check()
        self.method.params = self.params = params  # as the loop hands the method its adapter
        self.optimizer = optimizer

    def __call__(self, seed: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.method.loss(PROMPTS, seed).loss.backward()
        self.method.after_backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()


class HandLoop:
    """The same DRaFT step written directly against diffusers, peft and torch, using NO comfy_rft code.

    A deliberate, minimal, independent implementation (DDIMScheduler.step with η=0, CFG, VAE decode,
    brightness inline, a peft LoRA added with `unet.add_adapter`, AdamW): the floor the library's step
    is compared against. Prompts are encoded once, as the library caches them. SD1.x/SD2 UNets only.
    """

    def __init__(self, pipe, size: int):
        from diffusers import DDIMScheduler
        from peft import LoraConfig

        self.unet, self.vae = pipe.unet, pipe.vae
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LORA_TARGETS,
                                         init_lora_weights="gaussian"))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.device = self.unet.device
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(PROMPTS, self.device, 1, True)
        self.embeds = torch.cat([uncond, cond])
        latent = size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.shape = (len(PROMPTS), self.unet.config.in_channels, latent, latent)

    def _eps(self, x, t):
        uncond, cond = self.unet(torch.cat([x, x]), t, encoder_hidden_states=self.embeds).sample.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def _decode(self, z):
        return self.vae.decode(z / self.vae.config.scaling_factor).sample

    def step(self, steps: int, k: int, ckpt: bool, seed: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.set_timesteps(steps, device=self.device)
        x = torch.randn(self.shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        for i, t in enumerate(self.scheduler.timesteps):
            grad = i >= steps - k
            with torch.set_grad_enabled(grad):
                eps = checkpoint(self._eps, x, t, use_reentrant=False) if grad and ckpt else self._eps(x, t)
                x = self.scheduler.step(eps, t, x).prev_sample
        images = (checkpoint(self._decode, x, use_reentrant=False) if ckpt else self._decode(x)) / 2 + 0.5
        luma = images.clamp(0, 1) * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        (-luma.sum(1).mean()).backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(step, seed: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step(seed)
    _sync(device)
    return time.perf_counter() - start


def saved_bytes(step, seed: int, weights: set[int]) -> int:
    """Run the step and return the bytes autograd holds for backward: the unique storages of every
    tensor packed by the forward, model weights excluded. Checkpointed regions pack through their own
    hooks, so with checkpointing this is what stays held between them (inputs, scheduler math, decode)."""
    held: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(seed)
    return sum(held.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory(step, seed: int, device: torch.device, weights: set[int]) -> tuple[int, float]:
    """(saved bytes, peak bytes) of one (warm) step. Peak: on CUDA the allocator's peak above what was
    allocated before the step; on CPU (Linux) the growth of the process's peak RSS over its RSS before
    the step, after handing free heap pages back to the OS so that reusing them counts too."""
    _sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        saved = saved_bytes(step, seed, weights)
        return saved, torch.cuda.max_memory_allocated(device) - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:  # not Linux/glibc: no peak, the saved bytes still come
        return saved_bytes(step, seed, weights), float("nan")
    saved = saved_bytes(step, seed, weights)
    return saved, (_status_kib("VmHWM") - base) * 1024


def warm_time_and_peak(step, repeats: int, device: torch.device, weights: set[int]) -> tuple[float, float]:
    """After one warm-up call: the median seconds of `repeats` calls (seeds 1..repeats) and the peak MiB of one."""
    step(0)
    peak = memory(step, 0, device, weights)[1] / MiB
    return statistics.median(seconds(step, seed, device) for seed in range(1, repeats + 1)), peak


def weight_storages(*modules) -> set[int]:
    """The storages of the models' weights, which stay resident anyway and so are not step memory."""
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


def setup(args):
    backend = DiffusersBackend.load(args.model, device=args.device)
    if backend.is_sdxl:
        sys.exit("the hand loop is SD1.x/SD2 only: pass an SD1.x/SD2 model")
    reward = load_reward("brightness").to(torch.device(args.device))
    params = lora.inject_lora(backend.denoiser, RANK, ALPHA)
    return backend, reward, params, torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


RSAFT_BASES = {"DRaFT-1": dict(base="draft-k", k=1), "DRaFT-2": dict(base="draft-k", k=2),
               "DRaFT-LV": dict(base="draft-lv", k=1, lv_samples=2), "ReFL": dict(base="refl", k=1),
               "AlignProp": dict(base="alignprop", k=1)}  # ReFL: stop in the last 10 steps; AlignProp: K in [1, 4]


def flops(step, seed: int) -> int:
    """Floating-point operations of one step as torch counts them (matmuls and convolutions, backward and
    checkpoint recomputation included): a cost that, unlike time, does not move with the machine's load."""
    with FlopCounterMode(display=False) as counter:
        step(seed)
    return counter.get_total_flops()


def run_rsaft(args, backend, reward, params, optimizer) -> list[dict]:
    """RSA-FT (image and parameter perturbations, δ at θ), with the full and the shared-prefix rollout at θ + ε,
    against the plain base method it wraps, checkpointing on, interleaved per seed. Time ratios are medians of
    the per-seed ratios (each pair ran back to back), FLOP ratios are exact."""
    device = torch.device(args.device)
    rows = []
    for label, base in RSAFT_BASES.items():
        for steps in args.steps:
            impls = {name: LibraryStep(backend, reward, params, optimizer, steps, base["k"], True, args.resolution,
                                       (RsaftConfig, cls), {**base, **options})
                     for name, cls, options in (("base", DraftMethod, {}), ("rsaft", RsaftMethod, {}),
                                                ("shared", RsaftMethod, {"sam_rollout": "shared-prefix"}))}
            for step in impls.values():
                step(0)  # warm-up (also fills the prompt cache, whose text encoder would count)
            work = {name: flops(step, 0) for name, step in impls.items()}
            times = {name: [] for name in impls}
            for seed in range(1, args.repeats + 1):
                for name, step in impls.items():
                    times[name].append(seconds(step, seed, device))
            row = {"base": label, "T": steps, **{f"{n}_s": statistics.median(t) for n, t in times.items()}}
            for name, key in (("rsaft", "ratio"), ("shared", "shared_ratio")):
                row[key] = statistics.median(a / b for a, b in zip(times[name], times["base"]))
                row[key.replace("ratio", "flop_ratio")] = work[name] / work["base"]
            rows.append(row)
            print(f"  done RSA-FT {label} T={steps}", file=sys.stderr, flush=True)
    return rows


class SqdfSteps:
    """SQDF's two costs through the library's code, as `comfy_rft.loop.train` runs them: a rollout epoch (the
    step's prompts sampled without gradient, DDIM η=1, scored and stored in the replay buffer) and an update
    (`step_gradients`: buffer draws, one reparameterised step with the reference beside it, Tweedie's x̂0 from
    the reference, decode, reward, backward; then clipping and AdamW)."""

    def __init__(self, backend, reward, params, optimizer, steps: int, size: int):
        # replay_ratio out of reach: after the first epoch every step only updates (its rollouts are timed apart)
        config = SqdfConfig(sampling_steps=steps, batch_size=len(PROMPTS), guidance=GUIDANCE, resolution=size,
                            max_grad_norm=MAX_GRAD_NORM, replay_ratio=10**9)
        self.method = SqdfMethod(config, backend, reward)
        self.method.check()
        self.method.params = self.params = params
        self.optimizer, self.procs = optimizer, Processes()
        self.method.before_step(PROMPTS, 0, self.procs)  # the first epoch fills the buffer

    def rollout(self, seed: int) -> None:
        self.method.rollout(PROMPTS, seed, self.procs)

    def update(self, seed: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        step_gradients(self.method, PROMPTS, seed, self.procs)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()


def run_sqdf(args, backend, reward, params, optimizer) -> list[dict]:
    """SQDF's rollout epoch and update per T, checkpointing on (the default), Tweedie x̂0."""
    device = torch.device(args.device)
    weights = weight_storages(backend.denoiser, backend.vae, reward)
    rows = []
    for steps in args.steps:
        sqdf = SqdfSteps(backend, reward, params, optimizer, steps, args.resolution)
        row = {"T": steps}
        for name, step in (("rollout", sqdf.rollout), ("update", sqdf.update)):
            row[f"{name}_s"], row[f"{name}_peak_mib"] = warm_time_and_peak(step, args.repeats, device, weights)
        rows.append(row)
        print(f"  done SQDF T={steps}", file=sys.stderr, flush=True)
    return rows


def sqdf_table(rows: list[dict]) -> str:
    lines = ["| T | rollout epoch s | update s | rollout epoch peak MiB | update peak MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['rollout_s']:.3f} | {r['update_s']:.3f} | {r['rollout_peak_mib']:.1f} "
              f"| {r['update_peak_mib']:.1f} |" for r in rows]
    return "\n".join(lines)


def rsaft_table(rows: list[dict], limit: float = 2.2) -> str:
    lines = ["| base | T | base s | RSA-FT s | RSA-FT / base: time | FLOPs | shared-prefix s "
             "| shared-prefix / base: time | FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['base']} | {r['T']} | {r['base_s']:.3f} | {r['rsaft_s']:.3f} | {r['ratio']:.2f} "
              f"| {r['flop_ratio']:.3f} | {r['shared_s']:.3f} | {r['shared_ratio']:.2f} | {r['shared_flop_ratio']:.3f} |"
              for r in rows]
    lines.append("")
    for what, key in (("time", "ratio"), ("FLOPs", "flop_ratio")):
        worst = max(r[key] for r in rows)
        lines.append(f"RSA-FT step (full rollout at θ + ε) at most {limit}x "
                     f"its base in {what}: {'yes' if worst <= limit else 'no'} (worst {worst:.2f}x; "
                     f"median {statistics.median(r[key] for r in rows):.2f}x; shared-prefix worst "
                     f"{max(r['shared_' + key] for r in rows):.2f}x)")
    return "\n".join(lines)


def run_lasro(args, backend, reward, params, optimizer) -> list[dict]:
    """LaSRO with its defaults (JPEG size, guidance 1, N_s 4, 4 Bradley-Terry steps of 32) for 1 and 2 generator
    steps, the surrogate reading the whole UNet encoder or conv_in only: a generator step (rollout with gradient,
    surrogate, true reward of the samples, backward, clip, AdamW) and a surrogate round, timed apart."""
    device = torch.device(args.device)
    jpeg = load_reward("jpeg").to(device)
    rows = []
    for steps in (1, 2):
        for depth in (-1, 0):
            config = LasroConfig(sampling_steps=steps, surrogate_depth=depth, batch_size=len(PROMPTS),
                                 resolution=args.resolution, max_grad_norm=MAX_GRAD_NORM, surrogate_warmup=0,
                                 generator_steps=10**9)  # rounds only when called below
            method = LasroMethod(config, backend, jpeg)
            method.check()
            method.params = params
            method.surrogate_round(PROMPTS, 0, train=True)  # a buffer and the normaliser, as after stage 1
            method.steps_started = 1

            def generator_step(seed: int) -> None:
                optimizer.zero_grad(set_to_none=True)
                method.loss(PROMPTS, seed).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()

            def surrogate_round(seed: int) -> None:
                method.surrogate_round(PROMPTS, seed, train=True)

            weights = weight_storages(backend.denoiser, backend.vae, method.surrogate)
            row = {"T": steps, "depth": "all" if depth == -1 else "conv_in", "queries": method.config.batch_size
                   * config.samples_per_prompt * steps}
            for name, step in (("gen", generator_step), ("round", surrogate_round)):
                row[f"{name}_s"], row[f"{name}_peak_mib"] = warm_time_and_peak(step, args.repeats, device, weights)
            rows.append(row)
            print(f"  done LaSRO T={steps} depth={row['depth']}", file=sys.stderr, flush=True)
    return rows


def lasro_table(rows: list[dict]) -> str:
    lines = ["| T | surrogate reads | generator step s | generator peak MiB | surrogate round s | round peak MiB "
             "| true-reward queries per round |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['depth']} | {r['gen_s']:.3f} | {r['gen_peak_mib']:.1f} | {r['round_s']:.3f} "
              f"| {r['round_peak_mib']:.1f} | {r['queries']} |" for r in rows]
    return "\n".join(lines)


def run(args, backend, reward, params, optimizer) -> list[dict]:
    device = torch.device(args.device)
    hand = HandLoop(copy.deepcopy(backend.pipe), args.resolution)  # same weights, separate modules
    weights = weight_storages(backend.denoiser, backend.vae, hand.unet, hand.vae, reward)

    rows = []
    for ckpt in (True, False):
        for k_name in ("1", "2", "all"):
            for steps in args.steps:
                k = steps if k_name == "all" else int(k_name)
                if k > steps:
                    continue
                lib = LibraryStep(backend, reward, params, optimizer, steps, k, ckpt, args.resolution)
                impls = {"lib": lib, "hand": functools.partial(hand.step, steps, k, ckpt)}
                row = {"T": steps, "K": k_name, "ckpt": ckpt}
                for name, step in impls.items():
                    step(0)  # warm-up
                    row[f"{name}_saved_mib"], row[f"{name}_peak_mib"] = (
                        b / MiB for b in memory(step, 0, device, weights))
                times = {name: [] for name in impls}
                for seed in range(1, args.repeats + 1):  # interleaved: lib, hand, lib, hand, ...
                    for name, step in impls.items():
                        times[name].append(seconds(step, seed, device))
                for name in impls:
                    row[f"{name}_s"] = statistics.median(times[name])
                row["ratio"] = row["lib_s"] / row["hand_s"]
                rows.append(row)
                print(f"  done T={steps} K={k_name} ckpt={'on' if ckpt else 'off'}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| ckpt | K | T | library s | hand s | library / hand | library saved MiB | hand saved MiB "
            "| library peak MiB | hand peak MiB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(f"| {'on' if r['ckpt'] else 'off'} | {r['K']} | {r['T']} | {r['lib_s']:.3f} | {r['hand_s']:.3f} "
                     f"| {r['ratio']:.2f} | {r['lib_saved_mib']:.1f} | {r['hand_saved_mib']:.1f} "
                     f"| {r['lib_peak_mib']:.1f} | {r['hand_peak_mib']:.1f} |")
    return "\n".join(lines)


def flatness(rows: list[dict], limit: float = 1.5) -> str:
    """The README's claim: with checkpointing, for fixed K the step's peak memory does not grow with T.
    Memory kept per step would scale the peak with T (up to 5x from T=10 to 50); `limit` leaves room for
    the run-to-run jitter (about 2 MiB) of a small CPU RSS peak."""
    verdicts, details = [], []
    for k_name in ("1", "2"):
        peaks = {r["T"]: r["lib_peak_mib"] for r in rows if r["ckpt"] and r["K"] == k_name}
        if len(peaks) < 2:
            continue
        spread = max(peaks.values()) / min(peaks.values())
        verdicts.append(spread <= limit)
        details.append(f"K={k_name}: " + ", ".join(f"{p:.1f}" for p in peaks.values())
                       + f" MiB at T={'/'.join(map(str, peaks))}, max/min {spread:.2f}")
    if not verdicts:
        return "memory flat in T for fixed K: not checked (needs checkpointing rows at two or more T)"
    answer = "yes" if all(verdicts) else "no"
    return (f"memory flat in T for fixed K (library peak, checkpointing on, max/min <= {limit}): {answer} "
            f"({'; '.join(details)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per config after one warm-up")
    parser.add_argument("--steps", default="10,25,50", help="comma-separated DDIM step counts T")
    parser.add_argument("--model", default="tiny-sd15", help="tiny-sd15 or a local SD1.x/SD2 diffusers folder")
    parser.add_argument("--resolution", type=int, default=64, help="image size in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--json", help="also write the rows and the run's settings to this JSON file")
    parser.add_argument("--only", choices=("draft", "rsaft", "sqdf", "lasro"), help="run one of the four tables")
    args = parser.parse_args()
    args.steps = [int(s) for s in args.steps.split(",")]
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    setup_ = setup(args)
    rows = run(args, *setup_) if args.only in (None, "draft") else []
    rsaft_rows = run_rsaft(args, *setup_) if args.only in (None, "rsaft") else []
    sqdf_rows = run_sqdf(args, *setup_) if args.only in (None, "sqdf") else []
    lasro_rows = run_lasro(args, *setup_) if args.only in (None, "lasro") else []
    wall = time.perf_counter() - start
    if rows:
        print(table(rows))
        print()
        print(flatness(rows))
    if rsaft_rows:
        print()
        print(rsaft_table(rsaft_rows))
    if sqdf_rows:
        print()
        print(sqdf_table(sqdf_rows))
    if lasro_rows:
        print()
        print(lasro_table(lasro_rows))
    print(f"wall time {wall:.0f} s; device {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
          f"model {args.model}, {args.resolution} px, batch {len(PROMPTS)}, CFG {GUIDANCE}, "
          f"median of {args.repeats} after 1 warm-up")
    if args.json:
        settings = {**vars(args), "torch": torch.__version__, "wall_s": wall}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "rows": rows, "rsaft_rows": rsaft_rows, "sqdf_rows": sqdf_rows,
                       "lasro_rows": lasro_rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
