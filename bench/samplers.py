"""Fast samplers against the converged probability-flow ODE, and the ODE bound against the VLB.

Part `samplers`: with the packaged sampling model (or --model), draws `--samples` starting latents z_1 (image i
from the generator of (seed, i), as `vdm sample` does) and runs every sampler from the same z_1: DDIM (η = 0),
DPM-Solver++(2M) and (3M) at 5/10/20/50 network calls (grid uniform in λ, their default), ancestral at 100
and 1000 (grid uniform in t; 1000 steps on the first `--ancestral-1000-samples` images only, to bound the run
time), and the ODE at looser tolerances. Prints the pixel RMSE (grey levels 0–255, over all sub-pixels of the
decoded images) to the decoded ODE solution at `--ref-tol`, and wall-clock seconds per image.

Part `bound`: the probability-flow bound on −log p(x) (`vdm.evaluate.ode_image_terms`) beside the continuous
VLB on the first `--tiles` held-out photo tiles, in bits per dimension, with standard errors and the ODE's
function evaluations.

    OMP_NUM_THREADS=1 python bench/samplers.py --part samplers --threads 1
    OMP_NUM_THREADS=1 python bench/samplers.py --part bound --tiles 256 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Iterator

import numpy as np
import torch

from vdm.checkpoint import load_model
from vdm.choices import DEFAULT_GRID
from vdm.pretrained import PRETRAINED_DIR, SAMPLING_MODEL
from vdm.samplers import generate, prior_latent, time_grid
from vdm.seeding import image_generators

PACKAGED = str(PRETRAINED_DIR / SAMPLING_MODEL)


@contextlib.contextmanager
def count_network_calls(model) -> Iterator[list[int]]:
    """Within the block, [calls] counts the images passed through the score network (network calls × batch),
    by a forward pre-hook on `model.score_model` (removed at the end; blocks nest)."""
    counter = [0]

    def count(module, args):
        counter[0] += args[0].shape[0]

    handle = model.score_model.register_forward_pre_hook(count)
    try:
        yield counter
    finally:
        handle.remove()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(model, z_1, sampler, steps, **options):
    """(uint8 images, seconds per image, network calls per image) of one sampler from z_1."""
    times = [1.0, 0.0] if sampler == "ode" else time_grid(model, steps, DEFAULT_GRID[sampler])
    gens = image_generators(0, range(len(z_1)))
    for g in gens:  # consume the z_1 draws, so the step noise is what `vdm sample` would use
        torch.randn(tuple(z_1.shape[1:]), generator=g)
    start = time.perf_counter()
    with count_network_calls(model) as calls:
        x = generate(model, z_1, sampler, times, generator=gens, **options)
    return x, (time.perf_counter() - start) / len(z_1), calls[0] / len(z_1)


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((a.numpy().astype(np.float64) - b.numpy().astype(np.float64)) ** 2)))


def part_samplers(model, args) -> None:
    gens = image_generators(args.seed, range(args.samples))
    z_1 = prior_latent(model, args.samples, generator=gens)
    ref, ref_s, ref_calls = run(model, z_1, "ode", None, rtol=args.ref_tol, atol=args.ref_tol)
    print(f"reference: ODE (dopri5) at rtol = atol = {args.ref_tol:g}: {ref_calls:.0f} calls, "
          f"{ref_s:.2f} s/image", flush=True)
    print(f"\n{args.samples} samples from the same z_1 (seed {args.seed}); RMSE in grey levels (0–255) of the "
          f"decoded image to the reference")
    print("| sampler | grid | network calls | RMSE to the ODE solution | seconds per image |")
    print("|---|---|---|---|---|", flush=True)
    rows = [(s, k) for s in ("ddim", "dpmpp-2m", "dpmpp-3m") for k in args.steps]
    rows += [("ancestral", k) for k in args.ancestral_steps]
    rows += [("ode", tol) for tol in args.ode_tols]
    for sampler, k in rows:
        n = args.samples
        if sampler == "ancestral" and k >= 1000:
            n = min(n, args.ancestral_1000_samples)
        if sampler == "ode":
            x, s, c = run(model, z_1[:n], "ode", None, rtol=k, atol=k)
            grid, calls = f"adaptive, tol {k:g}", f"{c:.0f}"
        else:
            x, s, c = run(model, z_1[:n], sampler, k)
            grid, calls = DEFAULT_GRID[sampler], f"{c:.0f}"
        note = "" if n == args.samples else f" (first {n} samples)"
        print(f"| {sampler}{note} | {grid} | {calls} | {rmse(x, ref[:n]):.2f} | {s:.3f} |", flush=True)


def part_bound(model, args) -> None:
    from vdm.data import load_dataset
    from vdm.evaluate import evaluate, ode_image_terms, summarise_ode

    x = load_dataset("photos", "test", channels=model.config.channels, image_size=model.config.image_size)
    x = x[:args.tiles]
    start = time.perf_counter()
    terms, calls = ode_image_terms(model, x, rtol=args.bound_tol, atol=args.bound_tol, hutchinson=args.hutchinson,
                                   batch_size=args.batch, seed=args.seed, progress=False)
    seconds = time.perf_counter() - start
    r = summarise_ode(terms, calls, hutchinson=args.hutchinson, rtol=args.bound_tol, atol=args.bound_tol)
    v = evaluate(model, x, time_samples=args.time_samples, batch_size=args.batch, seed=args.seed, progress=False)
    print(f"\nfirst {len(x)} held-out photo tiles (photos/test), bits per dimension ± standard error over tiles")
    print("| bound | bpd | terms | network calls per image |")
    print("|---|---|---|---|")
    print(f"| probability-flow ODE (rtol = atol = {args.bound_tol:g}, {args.hutchinson} Hutchinson probe(s)) | "
          f"{r['ode_bpd']:.3f} ± {r['ode_bpd_sem']:.3f} | −log p_ODE(z_0) {r['ode_nll']:.3f}, −log p(x|z_0) "
          f"{r['ode_recon']:.3f}, log q(z_0|x) {r['ode_log_q']:.3f} | {r['function_evals']:.0f} evaluations "
          f"(each a forward and {args.hutchinson} vector-Jacobian product(s)), {seconds / len(x):.1f} s/image |")
    print(f"| VLB, continuous time ({args.time_samples} time samples) | {v['bpd']:.3f} ± {v['bpd_sem']:.3f} | "
          f"prior {v['prior']:.4f}, recon {v['recon']:.4f}, diff {v['diff']:.3f} | {args.time_samples} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("samplers", "bound", "all"), default="all")
    p.add_argument("--model", default=PACKAGED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--ancestral-steps", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--ancestral-1000-samples", type=int, default=16)
    p.add_argument("--ode-tols", type=float, nargs="+", default=[1e-3, 1e-4])
    p.add_argument("--ref-tol", type=float, default=1e-5)
    p.add_argument("--tiles", type=int, default=256)
    p.add_argument("--bound-tol", type=float, default=1e-5)
    p.add_argument("--hutchinson", type=int, default=1)
    p.add_argument("--time-samples", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    print(f"model {args.model}; torch {torch.__version__}; {cpu_name()}, {args.threads} thread(s); "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if args.part in ("samplers", "all"):
        part_samplers(model, args)
    if args.part in ("bound", "all"):
        part_bound(model, args)


if __name__ == "__main__":
    main()
