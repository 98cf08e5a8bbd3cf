"""Throughput of VDM training and evaluation, next to the matrix-multiply peak of the same machine.

For each network preset, pass, precision and mode it prints images per second and the achieved FLOP/s, beside
the FLOP/s of a large square matrix multiply timed at the same precision in the same run, right before the row
(so that both see the same load from other processes on a shared machine). The ratio `fraction_of_peak` is
the figure to quote.

- pass "train": one optimiser step = model.loss forward, backward of the mean negative VLB, AdamW step, EMA
  update (what `vdm train` does per step, and what the official code's training step does).
- pass "eval":  model.loss forward under torch.no_grad() (dropout off).
- precision "fp32", "bf16" (torch.autocast with bfloat16; parameters and optimiser state stay fp32) or "auto"
  (bf16 where the hardware has native bf16, else fp32: `vdm.precision`). Rows whose bf16 would be emulated in
  software (a CPU without AVX-512 BF16/AMX, a GPU before compute capability 8.0) are skipped, saying why,
  unless --allow-emulated.
- conv "direct" or "winograd" (3×3 convolutions through NNPACK, fp32 on CPU: `vdm.nets.winograd`) or "auto"
  (what `vdm train` picks on this machine).
- mode "eager" or "compile" (torch.compile of the score network: the cheap schedule and loss maths stay eager).

FLOPs are the model's matrix-multiply and convolution FLOPs (2 per multiply-add), counted once per preset with
torch.utils.flop_counter.FlopCounterMode on the meta device (backward included for "train", about 3x the forward);
element-wise work (GroupNorm, swish, the decoder's softmax) is not counted. Times are medians over iterations.

    python bench/throughput.py --quick                      # 1-3 minutes on any CPU
    python bench/throughput.py --networks cifar10 --batch 8 --precisions fp32 bf16 --modes eager compile
    python bench/throughput.py --quick --json               # one JSON object on stdout
    python bench/throughput.py --device cuda --batch 128    # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.flop_counter import FlopCounterMode

from vdm import VDM
from vdm.config import OptimConfig
from vdm.nets.winograd import use_winograd
from vdm.precision import CONV_ALGORITHMS, PRECISIONS, cpu_summary, resolve_conv_algorithm, resolve_precision
from vdm.train.ema import EMA
from vdm.train.optim import make_optimizer
from vdm.train.split import split_gradients

PRESETS = {
    "cifar10": dict(n_embd=128, n_layer=32, image_size=32, dropout=0.1, gamma_type="learned_linear"),
    "small": dict(n_embd=64, n_layer=4, image_size=32, dropout=0.1, gamma_type="learned_linear"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- timing -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def median_seconds(fn: Callable[[], object], iters: int, warmup: int, device: torch.device,
                   budget_s: float | None = None) -> float:
    """Median seconds of one call of `fn` after `warmup` untimed calls, on CLOCK; with `budget_s`, warm-up
    and timed calls stop once that much wall-clock time has passed (at least one call is timed).

    CLOCK is wall-clock time, or with `--clock cpu` this process's CPU time divided by the thread count: on a
    machine shared with other jobs that is less disturbed by time slicing (use it with --threads 1, since
    threads spinning at barriers while another is descheduled also burn CPU time).
    """
    start = time.perf_counter()

    def over_budget() -> bool:
        return budget_s is not None and time.perf_counter() - start > budget_s

    for _ in range(warmup):
        if over_budget():
            break
        fn()
    _sync(device)
    times = []
    per_thread = torch.get_num_threads() if CLOCK is time.process_time else 1
    for _ in range(iters):
        if times and over_budget():
            break
        t0 = CLOCK()
        fn()
        _sync(device)
        times.append((CLOCK() - t0) / per_thread)
    return statistics.median(times)


def matmul_peak(n: int, precision: str, device: torch.device, iters: int = 5) -> float:
    """FLOP/s (2·n³ per product) of an n×n by n×n matrix multiply in the given precision (median of `iters`)."""
    a = torch.randn(n, n, device=device).to(DTYPES[precision])
    b = torch.randn(n, n, device=device).to(DTYPES[precision])
    return 2 * n**3 / median_seconds(lambda: a @ b, iters, warmup=2, device=device)


# --- FLOP counting ------------------------------------------------------------------------------------------
def count_flops(preset: dict, pass_: str) -> int:
    """Matmul/convolution FLOPs of one image's `pass_` ("train": forward + backward, "eval": forward).

    Counted with FlopCounterMode on meta tensors (no arithmetic is done), batch 1; FLOPs scale linearly with
    the batch (the only attention is over the H·W positions of one image).
    """
    with torch.device("meta"):
        model = VDM(**preset)
    size = model.config.image_size
    x = torch.zeros(1, model.config.channels, size, size, dtype=torch.uint8, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        if pass_ == "train":
            out = model.loss(x)
            (out["prior"] + out["recon"] + out["diff"]).mean().backward()
        else:
            with torch.no_grad():
                model.loss(x)
    return counter.get_total_flops()


# --- the model under test -----------------------------------------------------------------------------------
def build(preset: dict, device: torch.device, mode: str, channels_last: bool, seed: int = 0,
          compile_mode: str | None = None) -> VDM:
    """The preset's VDM on `device`, optionally channels-last and with its score network compiled."""
    torch.manual_seed(seed)
    model = VDM(**preset).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if mode == "compile":
        torch._dynamo.reset()  # a fresh model per row: do not run into dynamo's recompilation limit
        model.score_model.compile(mode=compile_mode)
    return model


def images(preset: dict, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = preset["image_size"]
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(device)


def step_function(model: VDM, x: torch.Tensor, pass_: str, precision: str, conv: str = "direct",
                  ema_decay: float = 0.9999, split: int = 1) -> Callable[[], object]:
    """A closure running one training step (or one evaluation pass) on the fixed batch `x`; `precision` "fp32"
    or "bf16", `conv` "direct" or "winograd". With `split` K > 1 a training step's forward and backward run as
    K parts of the batch side by side on K Python threads (each part's operations on the thread that runs it,
    with torch's own thread count as set, e.g. 1), their gradients summed in a fixed order."""
    device_type = x.device.type

    def autocast():
        stack = contextlib.ExitStack()
        if precision == "bf16":
            stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        stack.enter_context(use_winograd(conv == "winograd"))
        return stack
    if pass_ == "eval":
        model.eval()

        def run():
            with torch.no_grad(), autocast():
                return model.loss(x)["bpd"]
        return run

    model.train()
    optimizer = make_optimizer(model, OptimConfig())  # as `vdm train`: AdamW lr 2e-4, β (0.9, 0.99), decay 0.01
    ema = EMA(model, ema_decay)
    step = [0]
    params = [p for p in model.parameters() if p.requires_grad]
    parts = x.chunk(split)
    pool = ThreadPoolExecutor(split) if split > 1 else None

    def part_loss(k: int) -> torch.Tensor:
        with autocast():
            out = model.loss(parts[k])
            return (out["prior"] + out["recon"] + out["diff"]).float().sum() / len(x)

    def run():
        optimizer.zero_grad(set_to_none=True)
        if pool is None:
            with autocast():
                out = model.loss(x)
                loss = (out["prior"] + out["recon"] + out["diff"]).float().mean()
            loss.backward()
        else:
            loss, grads = split_gradients(pool, part_loss, len(parts), params)  # what `vdm train` does
            for p, g in zip(params, grads):
                p.grad = g
        optimizer.step()
        ema.update(model, step[0])
        step[0] += 1
        return loss
    return run


def measure_row(network: str, pass_: str, precision: str, conv: str, mode: str, batch: int, args,
                flops_per_image: int) -> dict:
    """One row: images/s of the pass, achieved FLOP/s, and the matmul peak timed just before it; `precision`
    and `conv` resolved ("fp32"/"bf16", "direct"/"winograd")."""
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    split = args.split if pass_ == "train" else 1
    torch.set_num_threads(threads * split)  # the peak with every thread the row uses
    peak = matmul_peak(args.matmul_size, precision, device)
    torch.set_num_threads(threads)
    preset = PRESETS[network]
    model = build(preset, device, mode, args.channels_last, compile_mode=args.compile_mode)
    x = images(preset, batch, device)
    fn = step_function(model, x, pass_, precision, conv, split=split)
    t_compile = time.perf_counter()
    fn()  # first call: compiles in "compile" mode
    _sync(device)
    t_compile = time.perf_counter() - t_compile
    sec = median_seconds(fn, args.iters, args.warmup, device, args.row_budget)
    ips = batch / sec
    achieved = flops_per_image * ips
    return dict(network=network, **{"pass": pass_}, precision=precision, conv=conv, mode=mode, batch=batch,
                channels_last=args.channels_last, images_per_s=ips, seconds_per_step=sec,
                first_call_s=t_compile, flops_per_image=flops_per_image, flops_per_s=achieved,
                matmul_peak_flops_per_s=peak, fraction_of_peak=achieved / peak, clock=args.clock, threads=threads * split,
                split=split, load_avg_1min=_load())


# --- reporting ----------------------------------------------------------------------------------------------
def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(device),
                cpu_features=cpu_summary(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                load_avg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_row(r: dict) -> None:
    split = f" split {r['split']}" if r.get("split", 1) > 1 else ""
    print(f"{r['network']:8s} {r['pass']:5s} {r['precision']:4s} {r['conv']:8s} {r['mode']:7s} B={r['batch']:<4d}{split} "
          f"{r['images_per_s']:9.2f} img/s  {r['flops_per_s'] / 1e9:8.1f} GFLOP/s  "
          f"peak {r['matmul_peak_flops_per_s'] / 1e9:8.1f}  {100 * r['fraction_of_peak']:5.1f}% of peak  "
          f"(first call {r['first_call_s']:.1f} s, load {r['load_avg_1min']:.2f})", flush=True)


def plan(args) -> list[tuple[str, str, str, str, str, int]]:
    """The (network, pass, precision, conv, mode, batch) rows asked for (precision and conv not yet resolved)."""
    if args.quick:
        rows = [("small", p, prec, "auto", "eager", args.batch or 8) for p in ("train", "eval")
                for prec in ("fp32", "bf16")]
        rows.append(("cifar10", "train", "auto", "auto", "eager", 2))
        return rows
    return [(n, p, prec, conv, m, args.batch or 8) for n in args.networks for p in args.passes
            for prec in args.precisions for conv in args.convs for m in args.modes]


def resolve_row(pass_: str, precision: str, conv: str, device: torch.device,
                allow_emulated: bool) -> tuple[str, str, str]:
    """(precision, conv, why skipped or "") for a requested row on this machine. "auto" convolutions are what
    the software uses: Winograd where `vdm train` would take it, direct for evaluation."""
    choice = resolve_precision(precision, device, warn=False)
    if choice.emulated and not allow_emulated:
        return choice.precision, "", f"skipped: bf16 would be emulated in software here ({choice.reason}); " \
                                     "--allow-emulated runs it anyway"
    if pass_ == "eval" and conv == "auto":
        conv = "direct"
    resolved_conv = resolve_conv_algorithm(conv, device, choice.precision)
    if conv == "winograd" and resolved_conv != "winograd":
        return choice.precision, conv, f"skipped: Winograd needs fp32 on a CPU with NNPACK ({choice.reason})"
    return choice.precision, resolved_conv, ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", choices=sorted(PRESETS), default=["small", "cifar10"],
                   help="network presets (cifar10: the paper's C=128, L=32; small: C=64, L=4)")
    p.add_argument("--passes", nargs="+", choices=["train", "eval"], default=["train", "eval"])
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["auto"],
                   help="auto (default: bf16 where native, else fp32), bf16, fp32")
    p.add_argument("--convs", nargs="+", choices=CONV_ALGORITHMS, default=["auto"],
                   help="3×3 convolutions: auto (default: what vdm train picks here), direct, winograd")
    p.add_argument("--allow-emulated", action="store_true", help="also run bf16 rows where bf16 is emulated")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8; --quick: 8 small, 2 cifar10)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per row (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations after the first call (default 1)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n×n matmul giving the peak")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for --modes compile (default, reduce-overhead, max-autotune)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="run the network in channels-last memory format")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; --quick on CPU: 1)")
    p.add_argument("--split", type=int, default=1, metavar="K",
                   help="training rows: run the batch as K parts side by side on K threads, each with --threads "
                        "torch threads, gradients summed (default 1: one part); the peak is timed with K·threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall-clock time (default) or process CPU time per thread (steadier on a busy machine)")
    p.add_argument("--quick", action="store_true",
                   help="small net (train/eval, fp32/bf16 where native, eager) + CIFAR-10 training steps at batch 2 "
                        "(auto precision), one thread, at most 15 s of timing per row; 1-3 minutes on any CPU")
    p.add_argument("--row-budget", type=float, default=None, metavar="SECONDS",
                   help="stop a row's warm-up and timed iterations after this much wall-clock time (at least one "
                        "is timed; --quick: 15)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.split < 1 or (args.split > 1 and args.clock == "cpu"):
        p.error("--split must be at least 1, and a split step is timed on the wall clock (--clock wall)")
    args.iters = args.iters or (3 if args.quick else 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.quick:
        args.warmup = 0  # the first, untimed call warms up
        args.row_budget = 15.0 if args.row_budget is None else args.row_budget
        if args.threads is None and args.device == "cpu":
            args.threads = 1  # two threads on a loaded 2-core machine made --quick 4 minutes long
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    flops: dict[tuple[str, str], int] = {}
    rows = []
    skipped, seen = [], set()
    for network, pass_, requested, conv, mode, batch in plan(args):
        precision, conv, why = resolve_row(pass_, requested, conv, device, args.allow_emulated)
        if (network, pass_, precision, conv, mode, batch) in seen:  # e.g. auto = fp32 on this machine
            continue
        seen.add((network, pass_, precision, conv, mode, batch))
        if why:
            skipped.append(dict(network=network, **{"pass": pass_}, precision=requested, mode=mode, reason=why))
            if not args.json:
                print(f"{network:8s} {pass_:5s} {requested:4s} {mode:7s} {why}", flush=True)
            continue
        key = (network, pass_)
        if key not in flops:
            flops[key] = count_flops(PRESETS[network], pass_)
        row = measure_row(network, pass_, precision, conv, mode, batch, args, flops[key])
        rows.append(row)
        if not args.json:
            print_row(row)
    if args.json:
        print(json.dumps({"rows": rows, "skipped": skipped, "machine": machine_info(device),
                          "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
