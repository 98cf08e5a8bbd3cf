"""Where the coding network's time goes, against the float network, per evaluation.

Times one evaluation of ε̂ for `--units` units of the packaged model's training size (32×32) with the float
network (`VDM.eps_hat`, float32) and with the exact coding network (`vdm.codec.intnet.CodingNetwork`, what
`vdm compress` and `vdm decompress` run), median of `--repeats` runs at five noise levels, and splits the coding
network's time by part (exclusive times: a part's own work, not the parts it calls) and the float network's by
kind of operation (`torch.profiler` self times, so the two can be set side by side). The latents are what the
codec sees: z_γ = α_γ·x + σ_γ·ε for held-out test tiles x (`--random` for standard normal z instead). The three
are timed in alternating rounds (this machine's speed drifts); the coding network twice: with its compiled CPU
kernels (`vdm.codec.kernels`, what the codec runs on a CPU) and with torch operations only (its path on other
devices), which give the same bits.

    OMP_NUM_THREADS=1 python bench/coding_network.py --threads 1
    OMP_NUM_THREADS=1 python bench/coding_network.py --threads 1 --format 5   # + format 5's coding network
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np
import torch

from samplers import cpu_name  # bench/samplers.py, beside this script
from vdm import process
from vdm.codec import intnet
from vdm.pretrained import load_default_model

PARTS = {  # (class, method) → label
    (intnet.QuantLinear, "acc"): "convolutions and dense layers (exact integer sums)",
    (intnet.QuantLinear, "_acc_fused"): "convolutions and dense layers (exact integer sums)",
    (intnet.QuantLinear, "dense_sums"): "convolutions and dense layers (exact integer sums)",
    (intnet.QuantAttnBlock, "_quantised"): "attention: q, k, v quantisation",
    (intnet.QuantLinear, "__call__"): "output scale and bias",
    (intnet.QuantLinear, "residual"): "output scale and bias, rounded to the residual stream",
    (intnet.QuantNormAct, "__call__"): "GroupNorm + swish lookup",
    (intnet.QuantAttnBlock, "_weights"): "attention: softmax weights (table)",
    (intnet.QuantAttnBlock, "__call__"): "attention: scores, weighted sums, quantisation",
    (intnet.QuantResBlock, "__call__"): "residual blocks: rounding, clamping, adds",
    (intnet.CodingNetwork, "first_layer"): "first layer: z and Fourier features",
    (intnet.CodingNetwork, "eps"): "the rest (skips, concatenation, output)",
}


def instrument() -> dict[str, float]:
    spent: dict[str, float] = defaultdict(float)
    stack: list[list[float]] = []

    def wrap(fn, label):
        def timed(*a, **k):
            stack.append([time.perf_counter(), 0.0])  # start, time spent in nested parts
            try:
                return fn(*a, **k)
            finally:
                start, inner = stack.pop()
                total = time.perf_counter() - start
                spent[label] += total - inner
                if stack:
                    stack[-1][1] += total
        return timed

    for (cls, name), label in PARTS.items():
        timed = wrap(getattr(cls, name), label)
        setattr(cls, name, staticmethod(timed) if isinstance(cls.__dict__[name], staticmethod) else timed)
    return spent


FLOAT_OPS = (  # (label, substrings of the profiler's op names), first match wins
    ("convolutions", ("convolution", "conv2d")),
    ("attention (fused scaled dot-product kernel)", ("scaled_dot_product", "flash_attention")),
    ("matrix products (dense layers, attention)", ("bmm", "addmm", "aten::mm", "matmul", "linear")),
    ("softmax", ("softmax",)),
    ("GroupNorm", ("group_norm",)),
    ("swish", ("silu", "sigmoid")),
)


def part_table(title: str, runs: list[dict[str, float]], evaluations: int) -> None:
    """Median over runs of each part's ms per evaluation, as a markdown table."""
    labels = {label for run in runs for label in run}
    ms = {label: statistics.median(run.get(label, 0.0) for run in runs) * 1e3 / evaluations for label in labels}
    total = sum(ms.values())
    print(f"| {title} | ms per evaluation | share |\n|---|---|---|")
    for label, m in sorted(ms.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {m:.1f} | {m / total:.0%} |")
    print(f"| all parts (median of {len(runs)} runs each) | {total:.1f} | |\n")


def float_parts(call, repeats: int) -> list[dict[str, float]]:
    """The float network's time by kind of operation (torch.profiler self times, seconds), one dict per run."""
    from torch.profiler import ProfilerActivity, profile
    runs = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        spent: dict[str, float] = defaultdict(float)
        for ev in prof.key_averages():
            label = next((name for name, keys in FLOAT_OPS if any(k in ev.key for k in keys)), "the rest")
            spent[label] += ev.self_cpu_time_total / 1e6
        runs.append(spent)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--units", type=int, default=8, help="units per evaluation (vdm compress uses 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--random", action="store_true", help="standard normal latents instead of noised test tiles")
    p.add_argument("--format", type=int, action="append", default=[],
                   help="also time the coding network of this older format version (repeatable; e.g. 5)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default_model().eval()
    net = intnet.CodingNetwork(model)
    plain = intnet.CodingNetwork(model, fused=False)
    rng = np.random.default_rng(0)
    gammas = [-12.0, -8.0, -4.0, 0.0, 4.0]
    zs = [rng.standard_normal((args.units, model.config.channels, 32, 32)) for _ in gammas]
    if not args.random:
        from vdm.data import load_dataset
        tiles = load_dataset("photos", "test")
        x = tiles[np.linspace(0, len(tiles) - 1, args.units).round().astype(int)]
        f = process.encode(torch.from_numpy(x).double(), model.config.vocab_size).numpy()
        alpha_sigma = [process.alpha_sigma(torch.tensor(g, dtype=torch.float64)) for g in gammas]
        zs = [float(a) * f + float(s) * e for (a, s), e in zip(alpha_sigma, zs)]
    zts = [torch.from_numpy(z).float() for z in zs]

    def float_call():
        with torch.no_grad():
            for g, zt in zip(gammas, zts):
                model.eps_hat(zt, torch.tensor(g))

    def coding_call(network=net):
        with intnet.exact_arithmetic(args.threads), torch.no_grad():
            for g, z in zip(gammas, zs):
                network.eps(z, g)

    calls = {"float": float_call, "coding": coding_call, "plain": lambda: coding_call(plain)}
    for v in args.format:
        older = intnet.CodingNetwork(model, version=v)
        calls[f"format {v}"] = lambda older=older: coding_call(older)
    runs: dict[str, list[float]] = defaultdict(list)
    for fn in calls.values():
        fn()  # warm-up (and the kernels' compilation)
    for _ in range(args.repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - start) / len(gammas))
    f, c, t = (statistics.median(runs[name]) for name in ("float", "coding", "plain"))
    print(f"{cpu_name()}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} "
          f"thread(s); {args.units} units of 32×32 ({'standard normal' if args.random else 'noised test tiles'}), "
          f"per evaluation (median of {args.repeats})")
    print(f"float network:  {f * 1e3:.1f} ms\ncoding network: {c * 1e3:.1f} ms ({c / f:.2f}× the float network)\n"
          f"coding network, torch operations only: {t * 1e3:.1f} ms ({t / f:.2f}×)")
    for v in args.format:
        o = statistics.median(runs[f"format {v}"])
        print(f"coding network of format {v} (kernels): {o * 1e3:.1f} ms ({o / f:.2f}×; "
              f"this format's {c / o:.3f}× it)")
    print()
    part_table("part of the float network (profiler, self time)", float_parts(float_call, args.repeats), len(gammas))
    spent = instrument()
    runs = []
    for _ in range(args.repeats):
        spent.clear()
        coding_call()
        runs.append(dict(spent))
    part_table("part of the coding network", runs, len(gammas))


if __name__ == "__main__":
    main()
