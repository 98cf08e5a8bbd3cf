"""Time grids for 10-call DDIM and DPM-Solver++(2M): RMSE to the converged probability-flow ODE, per grid.

With the packaged sampling model (or --model), draws `--samples` starting latents z_1 (image i from the
generator of (0, `--first` + i), as `vdm sample --seed 0` does) and compares, on several families of time grids with
`--steps` network calls, the decoded images of DDIM (η = 0) and DPM-Solver++(2M) — the latter also with a
first-order last step ("lower order final") — with the decoded ODE solution at rtol = atol = `--ref-tol`.

Grid families (λ = −γ/2, from λ(1) to λ(0)):
  lambda       uniform in λ (the default of both samplers)
  t            uniform in t
  karrasR      σ/α = e^−λ spaced as in Karras et al. (2022) with ρ = R
  geomQ        λ steps growing geometrically by the factor Q
  truncD       uniform in λ from λ(1) to λ(0) − D in steps − 1 steps, then one step to t = 0

Tune on one set of latents (e.g. --first 1000), then measure the chosen grid on another (--first 0):

    OMP_NUM_THREADS=1 python bench/sampler_grids.py --first 1000 --samples 32
    OMP_NUM_THREADS=1 python bench/sampler_grids.py --first 0 --samples 64 --grids lambda trunc1 trunc2 trunc2.5
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from vdm import samplers as S
from vdm.checkpoint import load_model
from vdm.pretrained import PRETRAINED_DIR, SAMPLING_MODEL
from vdm.seeding import image_generators

FAMILIES = ("lambda", "t", "karras", "geom", "trunc")


def times_from_lambdas(model, lams) -> list[float]:
    """t(λ) for an increasing λ grid from λ(1) to λ(0) (γ = −2λ)."""
    return S.times_at_gammas(model, -2 * torch.as_tensor(np.asarray(lams), dtype=torch.float64))


def grid(model, name: str, steps: int) -> list[float]:
    with torch.no_grad():
        l_min, l_max = (float(-model.gamma(torch.tensor(t)) / 2) for t in (1.0, 0.0))
    family = name if name in ("lambda", "t") else next((f for f in FAMILIES[2:] if name.startswith(f)), None)
    if family is None:
        raise ValueError(f"unknown grid {name!r}: lambda, t, karras<rho>, geom<factor> or trunc<D>")
    p = float(name[len(family):]) if name != family else None
    if family == "lambda":
        return S.lambda_times(model, steps)
    if family == "t":
        return S.uniform_times(steps)
    if family == "karras":
        s_min, s_max = math.exp(-l_max), math.exp(-l_min)
        i = np.arange(steps + 1) / steps
        return times_from_lambdas(model, -np.log((s_max ** (1 / p) + i * (s_min ** (1 / p) - s_max ** (1 / p))) ** p))
    if family == "geom":
        w = p ** np.arange(steps)
        return times_from_lambdas(model, np.concatenate([[l_min], l_min + np.cumsum(w / w.sum() * (l_max - l_min))]))
    return times_from_lambdas(model, list(np.linspace(l_min, l_max - p, steps)) + [l_max])


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((a.numpy().astype(np.float64) - b.numpy().astype(np.float64)) ** 2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(PRETRAINED_DIR / SAMPLING_MODEL))
    p.add_argument("--first", type=int, default=1000, help="index of the first latent (generator (0, first + i))")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ref-tol", type=float, default=1e-5)
    p.add_argument("--grids", nargs="+", default=["lambda", "t", "karras5", "karras7", "karras9", "geom1.05",
                                                  "geom1.1", "trunc1", "trunc2"])
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model).eval()
    z_1 = S.prior_latent(model, args.samples, generator=image_generators(0, range(args.first,
                                                                                     args.first + args.samples)))
    start = time.perf_counter()
    ref = torch.cat([S.generate(model, z_1[i:i + 8], "ode", [1.0, 0.0], rtol=args.ref_tol, atol=args.ref_tol)
                     for i in range(0, len(z_1), 8)])
    print(f"model {args.model}; latents {args.first}..{args.first + args.samples - 1}; reference: ODE at rtol = "
          f"atol = {args.ref_tol:g} in batches of 8 ({time.perf_counter() - start:.0f} s); {args.steps} calls")
    print("| grid | DDIM | DPM-Solver++(2M) | ratio | 2M, first-order last step | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.grids:
        times = grid(model, name, args.steps)
        ddim = rmse(S.generate(model, z_1, "ddim", times), ref)
        dpm = rmse(S.generate(model, z_1, "dpmpp-2m", times), ref)
        with torch.no_grad():
            z = S.dpmpp_2m(model, z_1, times[:-1])
            lof = rmse(S.decode(model, S.ddim(model, z, times[-2:])), ref)
        print(f"| {name} | {ddim:.2f} | {dpm:.2f} | {dpm / ddim:.3f} | {lof:.2f} | {lof / ddim:.3f} |", flush=True)


if __name__ == "__main__":
    main()
