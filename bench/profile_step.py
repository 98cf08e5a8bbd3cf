"""Where a training step's time goes: torch.profiler over one step of `bench/throughput.py`'s training pass.

Prints the profiler's table of operators (self CPU time, top N) and a summary by kind of work: convolutions
(forward and backward), GroupNorm, swish, attention, the loss's element-wise work, the optimiser, the rest.

    python bench/profile_step.py --network cifar10 --batch 8 --threads 1            # fp32, eager, direct
    python bench/profile_step.py --network cifar10 --batch 8 --threads 1 --conv winograd
    python bench/profile_step.py --network cifar10 --batch 8 --threads 1 --channels-last
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import throughput as tp  # bench/throughput.py (this script's folder is on sys.path)

# operator-name fragments → kind of work (first match wins)
KINDS = [
    ("convolution", ("conv", "mkldnn_convolution")),
    ("GroupNorm", ("group_norm",)),
    ("swish (SiLU)", ("silu",)),
    ("attention", ("attention", "bmm", "baddbmm", "softmax")),
    ("linear (cond. projections)", ("addmm", "aten::mm", "linear")),
    ("optimiser (AdamW)", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("concatenation / copies", ("cat", "copy_", "clone", "contiguous", "to_copy")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other element-wise / bookkeeping"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", choices=sorted(tp.PRESETS), default="cifar10")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--conv", choices=["direct", "winograd"], default="direct", help="3×3 convolution algorithm")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--top", type=int, default=30, help="operators in the table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    preset = tp.PRESETS[args.network]
    model = tp.build(preset, device, "eager", args.channels_last)
    fn = tp.step_function(model, tp.images(preset, args.batch, device), "train", args.precision, args.conv)
    fn(), fn()  # warm-up: oneDNN primitive caches, optimiser state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    print(f"{args.network} training step, batch {args.batch}, {args.precision}, {args.threads} thread(s), "
          f"{args.conv} convolutions, channels_last={args.channels_last}: {wall:.2f} s wall under the profiler")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    total = sum(by_kind.values())
    print("self CPU time by kind of work:")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:34s} {us / 1e6:7.2f} s  {100 * us / total:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
