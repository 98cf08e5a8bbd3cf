"""What the exact coding network costs in rate: the chain's negative ELBO with its ε̂ against the float network's.

On `--tiles` held-out test tiles, every step i of the coded chain (the codec's T and spacing) is evaluated with
the same noise for both networks: z_i = α_i·f + σ_i·ε, diffusion term ½·expm1(γ_i − γ_{i−1})·‖ε − ε̂(z_i; γ_i)‖².
The prior and reconstruction terms do not involve ε̂ and are the same for both. The paired difference is what
the integer arithmetic of `vdm.codec.intnet` adds to the bound the codec can reach; the rest of a file's excess
over the float network's −ELBO_T (`bench/compress.py --tiles`) is the codec's own (header, top-up words,
warm-up, the latent grid). Also prints where along the chain the difference comes from.

    OMP_NUM_THREADS=1 python bench/coding_rate.py --threads 1 --tiles 64 --steps 200
    OMP_NUM_THREADS=1 python bench/coding_rate.py --threads 1 --tiles 32 --attention-bits 7 7  # other grids
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch

from compress import load  # bench/compress.py and bench/samplers.py, beside this script
from samplers import cpu_name
from vdm import process
from vdm.codec import CodingParams, intnet
from vdm.codec.compressor import coding_chain
from vdm.codec.container import FORMATS, SPACINGS, VERSION
from vdm.data import load_dataset
from vdm.evaluate import image_losses


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file/checkpoint/run (default: the packaged model)")
    p.add_argument("--tiles", type=int, default=64)
    p.add_argument("--steps", type=int, default=CodingParams().steps, help="T")
    p.add_argument("--spacing", choices=sorted(SPACINGS), default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-bits", type=int, nargs=2, metavar=("WEIGHTS", "VALUES"), default=None,
                   help="an experiment: attention's softmax weights on 2^WEIGHTS and values on 2^VALUES instead of "
                        "the format's (2^7 and 2^7 in format 6; what other grids would cost in rate; files are "
                        "always coded with the format's)")
    args = p.parse_args(argv)
    if args.attention_bits:
        FORMATS[VERSION] = dataclasses.replace(FORMATS[VERSION], attention_grids=tuple(args.attention_bits))
    torch.set_num_threads(args.threads)
    model = load(args)
    params = CodingParams(steps=args.steps, spacing=SPACINGS[args.spacing])
    chain = coding_chain(model, params)
    g = chain.gamma
    tiles = load_dataset("photos", "test")
    x = tiles[np.linspace(0, len(tiles) - 1, args.tiles).round().astype(int)]
    f = process.encode(torch.from_numpy(x).double(), model.config.vocab_size).numpy()
    D = x[0].size
    net = intnet.CodingNetwork(model)
    rng = np.random.default_rng(args.seed)
    T = params.steps
    loss_float = np.zeros((len(x), T))  # nats per tile and step (diffusion term)
    loss_exact = np.zeros((len(x), T))
    start = time.perf_counter()
    for i in range(1, T + 1):
        eps = rng.standard_normal(f.shape)
        z = chain.alpha[i] * f + chain.sigma[i] * eps
        weight = 0.5 * math.expm1(g[i] - g[i - 1])
        with torch.no_grad():
            e_float = model.eps_hat(torch.from_numpy(z).float(), torch.tensor(float(g[i]))).double().numpy()
        with intnet.exact_arithmetic(args.threads), torch.no_grad():
            e_exact = net.eps(z, float(g[i]))
        loss_float[:, i - 1] = weight * np.sum((eps - e_float) ** 2, axis=(1, 2, 3))
        loss_exact[:, i - 1] = weight * np.sum((eps - e_exact) ** 2, axis=(1, 2, 3))
        if i % 20 == 0:
            print(f"  step {i}/{T}  {time.perf_counter() - start:.0f} s", flush=True)
    to_bpd = 1.0 / (D * math.log(2))
    others = image_losses(model, x, time_samples=1, seed=args.seed, progress=False)[:, :2].sum(1)  # prior + recon
    fl = loss_float.sum(1) * to_bpd + others
    ex = loss_exact.sum(1) * to_bpd + others
    diff = ex - fl
    se = lambda v: v.std(ddof=1) / math.sqrt(len(v))  # noqa: E731
    spacing = {0: "even in t", 1: "SNR-weighted"}[params.spacing]
    print(f"\n{cpu_name()}, torch {torch.__version__}; {len(x)} test tiles 32×32×3, T = {T} ({spacing}), "
          f"one draw per tile and step (paired), seed {args.seed}\n")
    print("| network | negative ELBO_T, bits per sub-pixel (± s.e. over tiles) |\n|---|---|")
    print(f"| float (float32, what training measures) | {fl.mean():.4f} ± {se(fl):.4f} |")
    w, v = FORMATS[VERSION].attention_grids
    grids = f" (attention grids 2^{w} / 2^{v}, an experiment)" if args.attention_bits else ""
    print(f"| exact coding network (what the codec runs){grids} | {ex.mean():.4f} ± {se(ex):.4f} |")
    print(f"| difference (paired) | {diff.mean():+.4f} ± {se(diff):.4f} ({100 * diff.mean() / fl.mean():+.2f} %) |")
    print("\nwhere along the chain (diffusion term, bits per sub-pixel, by γ of the step):\n")
    print("| γ range | steps | float | exact − float |\n|---|---|---|---|")
    edges = [-math.inf, -10.0, -7.5, -5.0, -2.5, 0.0, 2.5, math.inf]
    gi = g[1:]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (gi > lo) & (gi <= hi)
        if sel.any():
            a = loss_float[:, sel].sum(1).mean() * to_bpd
            b = (loss_exact[:, sel] - loss_float[:, sel]).sum(1).mean() * to_bpd
            print(f"| ({lo:g}, {hi:g}] | {int(sel.sum())} | {a:.4f} | {b:+.4f} |")


if __name__ == "__main__":
    main()
