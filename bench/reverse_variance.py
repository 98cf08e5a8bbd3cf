"""What reverse variances fitted to the step would take off the T-step bound (a lever for fewer coding steps).

The codec's reverse transition p(z_s | z_t) has the forward posterior's variance σ̃² = σ_s²·c, c = −expm1(γ_s − γ_t),
and the posterior's mean with x̂ in place of x. Its KL to q(z_s | z_t, x) per dimension is ½·x·(ε − ε̂)² with
x = expm1(γ_t − γ_s). With the variance r·σ̃² instead, the KL is ½·(log r + (1 + x·(ε − ε̂)²)/r − 1), smallest in
expectation at r = 1 + x·ē for the mean squared error ē = E(ε − ε̂)² at that step (Bao et al. 2022, Analytic-DPM,
in VDM's variables): ½·log(1 + x·ē) instead of ½·x·ē. Here ē is estimated per step on calibration tiles and the
T-step negative ELBO (prior + reconstruction + the T KL terms, one draw per tile and step, the same draws for
both variances) is measured on other held-out tiles, for several T and both step spacings:

    python bench/reverse_variance.py [--model FILE] [--calibration 64] [--tiles 128] [--steps 25 50 100 200]

Bits per sub-pixel, mean ± standard error over tiles; the difference is paired. Float network (what training
measures); the coding network's own cost is apart (bench/coding_rate.py).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from compress import load  # bench/compress.py, beside this script
from samplers import cpu_name
from vdm import process
from vdm.codec.chain import chain_gammas
from vdm.codec.container import CodingParams
from vdm.data import load_dataset
from vdm.evaluate import image_losses


def squared_errors(model, f: torch.Tensor, gammas: np.ndarray, seed: int, batch: int) -> np.ndarray:
    """Per tile and step i = 1..T: Σ over dimensions of (ε − ε̂(z_{t_i}))², one ε per tile and step; (N, T)."""
    g = torch.Generator().manual_seed(seed)
    T = len(gammas) - 1
    out = np.zeros((f.shape[0], T))
    with torch.no_grad():
        for i in range(1, T + 1):
            eps = torch.randn(f.shape, generator=g)
            gam = torch.tensor(float(gammas[i]))
            for b in range(0, f.shape[0], batch):
                z = process.sample_z_t(f[b:b + batch], gam, eps[b:b + batch])
                err = eps[b:b + batch] - model.eps_hat(z, gam.expand(z.shape[0]))
                out[b:b + batch, i - 1] = err.double().square().flatten(1).sum(1).numpy()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model file/checkpoint/run (default: the packaged model)")
    p.add_argument("--calibration", type=int, default=64, help="test tiles on which ē per step is estimated")
    p.add_argument("--tiles", type=int, default=128, help="other test tiles on which the bound is measured")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args).eval()
    tiles = load_dataset("photos", "test")
    order = np.random.default_rng(0).permutation(len(tiles))  # two disjoint random sets of held-out tiles
    cal, ev = tiles[order[:args.calibration]], tiles[order[args.calibration:args.calibration + args.tiles]]
    f_cal, f_ev = (model.encode(torch.from_numpy(x)) for x in (cal, ev))
    D = ev[0].size
    to_bits = 1.0 / (D * math.log(2))
    ends = image_losses(model, ev, time_samples=1, seed=0, progress=False)[:, :2].sum(1)  # prior + recon, bits/dim
    density = CodingParams().spacing_density
    print(f"{cpu_name()}, torch {torch.__version__}; calibration {len(cal)} tiles, evaluation {len(ev)} other "
          f"test tiles (32×32×3), one draw per tile and step\n")
    print("| T | spacing | −ELBO_T, posterior variance | −ELBO_T, fitted variance | change |")
    print("|---|---|---|---|---|")
    start = time.perf_counter()
    for T in args.steps:
        for name, dens in (("even in t", None), ("SNR-weighted", density)):
            gammas = chain_gammas(model, T, dens)
            x = np.expm1(np.diff(gammas))  # (T,)
            e_bar = squared_errors(model, f_cal, gammas, 1, args.batch).mean(0) / D  # per dimension
            r = 1.0 + x * e_bar
            s = squared_errors(model, f_ev, gammas, 2, args.batch)  # (N, T)
            posterior = 0.5 * (x * s).sum(1) * to_bits + ends
            fitted = 0.5 * (D * np.log(r) + (D + x * s) / r - D).sum(1) * to_bits + ends
            d = fitted - posterior
            se = lambda v: v.std(ddof=1) / math.sqrt(len(v))  # noqa: E731
            print(f"| {T} | {name} | {posterior.mean():.4f} ± {se(posterior):.4f} | {fitted.mean():.4f} ± "
                  f"{se(fitted):.4f} | {d.mean():+.4f} ± {se(d):.4f} ({100 * d.mean() / posterior.mean():+.2f} %) |",
                  flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
