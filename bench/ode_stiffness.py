"""How smooth is a model's probability flow (default: the packaged sampling model)? Self-convergence of DDIM
and DPM-Solver++(2M) as the number of steps doubles, in float32 and float64, and the per-step error of a
10-step run.

A solver of order p on a smooth flow shrinks the difference between K and 2K steps by 2^p per doubling. Printed:
RMS differences (grey levels, 0–255 scale, of z/α at t = 0, before rounding) between K and 2K steps on a λ-uniform
grid for K = 50, 100, 200, 400; then, for 10 steps, the error after each step against the ODE solution at the
same λ (dopri5, rtol = atol = 1e-6), in grey levels of z/α.

    OMP_NUM_THREADS=1 python bench/ode_stiffness.py --samples 2

`--sensitivity` instead measures how the flow itself amplifies small differences: the ODE solution in float64
(dopri5, rtol = atol = `--rtol`) from z_1 and from z_1 + δ·u (u standard normal, δ = 1e-6 … 1e-2), and the same
solution in float32; RMS differences in grey levels of z/α at t = 0. On a well-conditioned flow the difference
grows in proportion to δ and stays far below a grey level for small δ; if it does not, the distance of a sampler's
output to one reference solution measures that sensitivity, not the sampler's error.

    OMP_NUM_THREADS=1 python bench/ode_stiffness.py --samples 4 --sensitivity
"""

from __future__ import annotations

import argparse

import torch
from torchdiffeq import odeint

from samplers import count_network_calls  # bench/samplers.py, beside this script
from vdm import process
from vdm import samplers as S
from vdm.checkpoint import load_model
from vdm.pretrained import PRETRAINED_DIR, SAMPLING_MODEL
from vdm.seeding import image_generators


def rms(a, b, alpha: float = 1.0) -> float:
    return float(torch.sqrt(torch.mean(((a - b).double() / alpha) ** 2))) * 127.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(PRETRAINED_DIR / SAMPLING_MODEL))
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 400])
    p.add_argument("--sensitivity", action="store_true", help="perturb z_1 instead (see above)")
    p.add_argument("--rtol", type=float, default=1e-6, help="ODE tolerance of --sensitivity")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model).eval()
    z_1 = S.prior_latent(model, args.samples, generator=image_generators(0, range(args.samples)))
    print(f"model {args.model}; {args.samples} samples (seed 0)")
    if args.sensitivity:
        sensitivity(model, z_1, args.rtol)
        return
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            m, z = model.to(dtype), z_1.to(dtype)
            alpha_0 = float(process.alpha_sigma(m.gamma(torch.tensor(0.0, dtype=dtype)))[0])
            for name in ("ddim", "dpmpp-2m"):
                runs = {k: S.SAMPLERS[name](m, z, S.lambda_times(m, k)) for k in args.steps + [2 * args.steps[-1]]}
                diffs = ", ".join(f"{k}→{2 * k}: {rms(runs[k], runs[2 * k], alpha_0):.3f}" for k in args.steps)
                print(f"{str(dtype).split('.')[1]} {name}: K → 2K steps differ by {diffs}", flush=True)
        model.to(torch.float32)
        times = S.lambda_times(model, 10)
        gammas = torch.stack([model.gamma(torch.tensor(t)) for t in times])
        ref = odeint(lambda g, z: process.probability_flow(z, model.eps_hat(z, g), g), z_1, gammas,
                     rtol=1e-6, atol=1e-6)
        alphas = [float(process.alpha_sigma(g)[0]) for g in gammas]
        print("10 steps, λ after each step:", " ".join(f"{float(process.log_snr(g)):.2f}" for g in gammas[1:]))
        for name in ("ddim", "dpmpp-2m"):
            # the first i steps of a run are the run on the first i + 1 times (the samplers look only back)
            errs = [rms(S.SAMPLERS[name](model, z_1, times[:i + 1]), ref[i], alphas[i]) for i in range(1, 11)]
            print(f"{name}: error after each step", " ".join(f"{e:.2f}" for e in errs), flush=True)


def sensitivity(model, z_1: torch.Tensor, rtol: float) -> None:
    """RMS change of the ODE solution (float64) under perturbations of z_1, and float32 against float64."""
    with torch.no_grad():
        m = model.to(torch.float64)
        alpha_0 = float(process.alpha_sigma(m.gamma(torch.tensor(0.0, dtype=torch.float64)))[0])
        z64 = z_1.to(torch.float64)
        with count_network_calls(m) as calls:
            ref = S.ode(m, z64, rtol=rtol, atol=rtol)
        print(f"float64 reference, rtol = atol = {rtol:g}: {calls[0] // len(z64)} network calls", flush=True)
        u = torch.randn(z64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for delta in (1e-6, 1e-4, 1e-2):
            out = S.ode(m, z64 + delta * u, rtol=rtol, atol=rtol)
            print(f"z_1 + {delta:g}·u: RMS difference {rms(out, ref, alpha_0):.4f} grey levels "
                  f"(per image: {' '.join(f'{rms(o, r, alpha_0):.3f}' for o, r in zip(out, ref))})", flush=True)
        out = S.ode(m, z64, rtol=rtol / 10, atol=rtol / 10)
        print(f"float64, rtol = atol = {rtol / 10:g}: RMS difference {rms(out, ref, alpha_0):.4f}", flush=True)
        m32 = model.to(torch.float32)
        out = S.ode(m32, z_1, rtol=rtol, atol=rtol)
        print(f"float32, same tolerance: RMS difference {rms(out, ref, alpha_0):.4f} grey levels", flush=True)


if __name__ == "__main__":
    main()
