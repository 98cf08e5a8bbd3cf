"""How the codec's T steps should be spaced: e(γ) = E‖ε − ε̂‖² of a model, the T-step chain loss it implies for
even steps in t (format 4) and for the SNR-weighted spacing of format 5, and the spacing parameters (a, b) that
minimise it.

The chain's diffusion loss is ½·Σ_i expm1(γ_i − γ_{i−1})·e(γ_i) per dimension; its continuous limit ½·∫e dγ.
Step 1 measures e at `--points` times on `--tiles` held-out tiles (the model's γ(t); a fresh ε per time), step 2
evaluates that sum for even steps and for `chain.snr_spaced_gammas` with (a, b) on a grid (interpolating e),
step 3 (`--validate N`) measures the chain's −ELBO exactly (`image_losses(gammas=…)`, every step once per tile)
on N other tiles for even steps and for the format's default (a, b).

    python bench/chain_spacing.py --threads 2 --validate 64
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file/checkpoint/run (default: the packaged model)")
    p.add_argument("--tiles", type=int, default=32, help="tiles for e(γ)")
    p.add_argument("--points", type=int, default=200, help="times at which e(γ) is measured")
    p.add_argument("--validate", type=int, default=0, help="tiles for the exact chain ELBO check (0 = skip)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    from vdm import process
    from vdm.checkpoint import load_model
    from vdm.codec.chain import chain_gammas, gammas, snr_spaced_gammas
    from vdm.codec.container import CodingParams
    from vdm.data import load_dataset
    from vdm.evaluate import image_losses
    from vdm.pretrained import load_default_model
    if args.threads:
        torch.set_num_threads(args.threads)
    model = (load_model(args.model) if args.model else load_default_model()).eval()
    tiles = load_dataset("photos", "test")
    x = torch.from_numpy(tiles[np.linspace(0, len(tiles) - 1, args.tiles).round().astype(int)])
    t0 = time.perf_counter()
    ts = (np.arange(args.points) + 0.5) / args.points
    e = np.zeros(args.points)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        f = model.encode(x)
        for k, t in enumerate(ts):
            gam = model.gamma(torch.full((len(x),), float(t)))
            eps = torch.randn(f.shape, generator=g)
            z = process.sample_z_t(f, gam[:, None, None, None], eps)
            e[k] = float(((eps - model.eps_hat(z, gam)) ** 2).mean())
        gam_t = model.gamma(torch.from_numpy(ts).float()).double().numpy()
    g0, g1 = (float(v) for v in gammas(model, 1))
    print(f"e(γ) on {len(x)} tiles at {args.points} times: {time.perf_counter() - t0:.0f} s; γ from {g0:.3f} to {g1:.3f}")
    for k in range(0, args.points, max(1, args.points // 8)):
        print(f"  γ = {gam_t[k]:7.3f}   e = {e[k]:.4f}")

    to_bits = 1 / math.log(2)

    def chain_loss(gs: np.ndarray) -> float:  # bits per dimension
        return 0.5 * float(np.sum(np.expm1(np.diff(gs)) * np.interp(gs[1:], gam_t, e))) * to_bits

    fine = np.linspace(g0, g1, 100_001)
    limit = 0.5 * float(np.sum(np.diff(fine) * np.interp(fine[1:], gam_t, e))) * to_bits
    default = CodingParams().spacing_density
    best = min(((chain_loss(snr_spaced_gammas(g0, g1, 200, a, b)), a, b)
                for a in np.arange(0.125, 1.51, 0.125) for b in np.arange(-12.0, 2.01, 0.5)))
    print(f"\ndiffusion term, bits/dim (e interpolated); continuous limit {limit:.4f}")
    print(f"best (a, b) at T = 200 on the grid a ∈ 0.125…1.5, b ∈ −12…2: ({best[1]:.3f}, {best[2]:.1f}); "
          f"the format's default ({default[0]:.3f}, {default[1]:.1f})\n")
    print("| T | even in t | SNR-weighted, default (a, b) | SNR-weighted, best (a, b) |")
    print("|---|---|---|---|")
    for T in (10, 20, 50, 100, 200, 400, 1000):
        even = chain_loss(gammas(model, T))
        dflt = chain_loss(snr_spaced_gammas(g0, g1, T, *default))
        tuned = chain_loss(snr_spaced_gammas(g0, g1, T, best[1], best[2]))
        print(f"| {T} | {even:.4f} | {dflt:.4f} ({dflt - even:+.4f}) | {tuned:.4f} ({tuned - even:+.4f}) |")
    if args.validate:
        rest = np.setdiff1d(np.arange(len(tiles)), np.linspace(0, len(tiles) - 1, args.tiles).round().astype(int))
        xv = tiles[rest[np.linspace(0, len(rest) - 1, args.validate).round().astype(int)]]
        T = CodingParams().steps
        print(f"\nexact chain −ELBO, T = {T}, on {len(xv)} other test tiles (bits/dim, ± s.e.; same draws):")
        res = {}
        for name, sp in (("even in t", 0), ("SNR-weighted (default a, b)", 1)):
            gs = chain_gammas(model, T, default if sp else None)
            b = image_losses(model, xv, time_samples=T, seed=0, batch_size=256, gammas=gs, progress=False).sum(1)
            res[name] = b
            print(f"  {name}: {b.mean():.4f} ± {b.std(ddof=1) / math.sqrt(len(b)):.4f}")
        diff = res["SNR-weighted (default a, b)"] - res["even in t"]
        print(f"  difference: {diff.mean():+.4f} ± {diff.std(ddof=1) / math.sqrt(len(diff)):.4f} "
              f"({100 * diff.mean() / res['even in t'].mean():+.2f} %)")


if __name__ == "__main__":
    main()
