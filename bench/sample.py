"""Seconds per image of ancestral sampling (`VDM.sample`) with T steps.

Times `model.sample(batch, T)` on a randomly initialised network of the chosen size (the cost does not depend on
the weights), after one untimed warm-up run with a few steps (which also compiles in "compile" mode). Prints
seconds per image, seconds per step for the whole batch, and the achieved FLOP/s of the network evaluations
(FlopCounterMode on the meta device, one forward per step; element-wise work not counted).

    python bench/sample.py                                        # small net, T = 100, batch 8, auto precision
    python bench/sample.py --network cifar10 --steps 1000 --batch 4 --precisions bf16
    python bench/sample.py --n-embd 96 --n-layer 8 --steps 50 --modes eager compile --json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from vdm import VDM, VDMConfig
from vdm.precision import PRECISIONS, resolve_precision

PRESETS = {
    "cifar10": dict(n_embd=128, n_layer=32, image_size=32, dropout=0.1, gamma_type="learned_linear"),
    "small": dict(n_embd=64, n_layer=4, image_size=32, dropout=0.1, gamma_type="learned_linear"),
}


def network_config(args) -> VDMConfig:
    """The preset, with --n-embd / --n-layer / --image-size / --attention overrides."""
    cfg = VDMConfig(**PRESETS[args.network])
    over = {k: v for k, v in dict(n_embd=args.n_embd, n_layer=args.n_layer, image_size=args.image_size,
                                   attention=args.attention).items() if v is not None}
    return dataclasses.replace(cfg, **over)


def forward_flops(config: VDMConfig) -> int:
    """Matmul/convolution FLOPs of one network evaluation for one image (meta device, nothing computed)."""
    with torch.device("meta"):
        model = VDM(config)
    s = config.image_size
    z = torch.zeros(1, config.channels, s, s, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eps_hat(z, torch.zeros(1, device="meta"))
    return counter.get_total_flops()


def time_sampling(config: VDMConfig, precision: str, mode: str, args) -> dict:
    """Wall-clock seconds of `model.sample(args.batch, args.steps)`; one row of the report."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = VDM(config).to(device)
    if mode == "compile":
        model.score_model.compile()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    gen = torch.Generator(device).manual_seed(0)
    with autocast:
        t0 = time.perf_counter()
        model.sample(args.batch, min(args.steps, 2), generator=gen)  # warm-up (and compilation)
        _sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = model.sample(args.batch, args.steps, generator=gen, progress=args.progress)
        _sync(device)
        sec = time.perf_counter() - t0
    assert x.shape == (args.batch, config.channels, config.image_size, config.image_size)
    flops = forward_flops(config) * args.batch * args.steps
    return dict(n_embd=config.n_embd, n_layer=config.n_layer, image_size=config.image_size, precision=precision,
                mode=mode, batch=args.batch, steps=args.steps, seconds=sec, seconds_per_image=sec / args.batch,
                seconds_per_step=sec / args.steps, flops_per_s=flops / sec, warmup_s=warm,
                load_avg_1min=os.getloadavg()[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", choices=sorted(PRESETS), default="small",
                   help="size preset (cifar10: C=128, L=32; small: C=64, L=4)")
    p.add_argument("--n-embd", type=int, help="override the width C")
    p.add_argument("--n-layer", type=int, help="override the depth L")
    p.add_argument("--image-size", type=int, help="override the image size")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="self-attention after every block")
    p.add_argument("--steps", type=int, default=100, help="T, the number of ancestral steps")
    p.add_argument("--batch", type=int, default=8, help="images drawn at once")
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["auto"],
                   help="auto (default: bf16 where native, else fp32), bf16, fp32; bf16 where it would be "
                        "emulated is skipped unless --allow-emulated")
    p.add_argument("--allow-emulated", action="store_true", help="also run bf16 where it is emulated")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager"],
                   help="eager, and/or torch.compile of the score network")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    p.add_argument("--progress", action="store_true", help="progress bar over the steps")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    config = network_config(args)
    rows = []
    for requested in args.precisions:
        choice = resolve_precision(requested, args.device, warn=False)
        precision = choice.precision
        if choice.emulated and not args.allow_emulated:
            print(f"{requested}: skipped, bf16 would be emulated in software here ({choice.reason}); "
                  "--allow-emulated runs it anyway", flush=True)
            continue
        for mode in args.modes:
            r = time_sampling(config, precision, mode, args)
            rows.append(r)
            if not args.json:
                print(f"C={r['n_embd']} L={r['n_layer']} {r['image_size']}px {precision} {mode:7s} "
                      f"B={r['batch']} T={r['steps']}: {r['seconds_per_image']:.3f} s/image "
                      f"({r['seconds_per_step']:.3f} s/step, {r['flops_per_s'] / 1e9:.1f} GFLOP/s; "
                      f"load {r['load_avg_1min']:.2f})", flush=True)
    if args.json:
        print(json.dumps({"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": args.device}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
