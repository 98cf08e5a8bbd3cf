"""Variance minimisation of the noise schedule: does it lower the variance of the diffusion-loss estimator
without making the VLB worse?

Trains the same small VDM three times from the same initialisation, data order and noise, on the embedded
photo tiles: (a) fixed linear schedule, (b) learned monotone network trained on the VLB alone, (c) learned
monotone network whose endpoints follow the VLB and whose shape follows ∂E[L_diff²] (`variance_minimisation`).
Then, on held-out tiles, with i.i.d. (not antithetic) times, it prints per run: the mean negative VLB in bits per
dimension with its standard error, and the per-example variance of the continuous-time diffusion loss
(in (bits/dim)²). Example:

    python bench/variance.py --steps 600 --batch 32
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from vdm import VDM
from vdm.data import load_dataset

RUNS = {
    "fixed linear": dict(gamma_type="fixed_linear"),
    "learned nnet, VLB gradient": dict(gamma_type="learned_nnet"),
    "learned nnet, variance minimisation": dict(gamma_type="learned_nnet", variance_minimisation=True),
}


def train(model: VDM, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
          schedule_lr_mult: float) -> VDM:
    """Plain AdamW with warm-up; every run sees the same batches and noise (same seed)."""
    gen = torch.Generator().manual_seed(seed)
    groups = [{"params": list(model.score_model.parameters()), "lr": lr},
              {"params": list(model.gamma.parameters()), "lr": lr * schedule_lr_mult}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    for _ in tqdm(range(steps), desc=model.config.gamma_type, leave=False):
        idx = torch.randint(len(data), (batch,), generator=gen)
        out = model.loss(data[idx], generator=gen)
        loss = (out["prior"] + out["recon"] + out["diff"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


@torch.no_grad()
def evaluate(model: VDM, data: torch.Tensor, samples: int, seed: int, batch: int = 256) -> dict:
    """Mean VLB (bpd) ± standard error over images, and Var[L_diff] per example over i.i.d. (t, ε)."""
    model.eval()
    model.config.antithetic = False
    gen = torch.Generator().manual_seed(seed)
    per_image, diffs = [], []
    for i in range(0, len(data), batch):
        x = data[i:i + batch]
        vals, d = [], []
        for _ in range(samples):
            out = model.loss(x, generator=gen)
            vals.append(out["bpd"])
            d.append(out["diff"] / (model.num_dims(x) * math.log(2)))
        per_image.append(torch.stack(vals).mean(0))
        diffs.append(torch.stack(d, 1))
    per_image = torch.cat(per_image)
    diffs = torch.cat(diffs)  # (N, samples) diffusion loss in bpd
    within = diffs.var(dim=1).mean()  # variance over (t, ε) for a fixed image, averaged over images
    return {"bpd": per_image.mean().item(), "bpd_se": (per_image.std() / math.sqrt(len(per_image))).item(),
            "var_diff": diffs.var().item(), "var_diff_given_x": within.item(),
            "gamma": model.gamma(torch.tensor([0.0, 0.5, 1.0])).tolist()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--schedule-lr-mult", type=float, default=10.0, help="learning rate of γ's parameters / lr")
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=8, help="(t, ε) draws per test image")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_x = torch.from_numpy(load_dataset("photos", "train"))
    test_x = torch.from_numpy(load_dataset("photos", "test"))
    test_x = test_x[torch.randperm(len(test_x), generator=torch.Generator().manual_seed(1))[:args.eval_images]]
    base = VDM(n_embd=args.n_embd, n_layer=args.n_layer, dropout=0.0, gamma_type="learned_nnet")
    net_init = copy.deepcopy(base.score_model.state_dict())

    rows = []
    for name, cfg in RUNS.items():
        model = VDM(n_embd=args.n_embd, n_layer=args.n_layer, dropout=0.0, **cfg)
        model.score_model.load_state_dict(net_init)
        start = time.perf_counter()
        train(model, train_x, args.steps, args.batch, args.lr, args.seed, args.schedule_lr_mult)
        res = evaluate(model, test_x, args.eval_samples, args.seed + 1)
        res["minutes"] = (time.perf_counter() - start) / 60
        rows.append((name, res))
        print(f"{name}: {res}", flush=True)

    ref = rows[0][1]["var_diff_given_x"]
    print(f"\n{args.steps} steps, batch {args.batch}, lr {args.lr} (schedule x{args.schedule_lr_mult}), "
          f"C={args.n_embd}, L={args.n_layer}; "
          f"{len(test_x)} test tiles x {args.eval_samples} (t, eps) draws, i.i.d. times\n")
    print("| schedule | test bpd (± s.e.) | Var[L_diff] per example, given x (bpd²) | ratio to fixed | "
          "Var[L_diff] over x and t (bpd²) | γ(0), γ(½), γ(1) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        g = ", ".join(f"{v:.2f}" for v in r["gamma"])
        print(f"| {name} | {r['bpd']:.3f} ± {r['bpd_se']:.3f} | {r['var_diff_given_x']:.4f} | "
              f"{r['var_diff_given_x'] / ref:.3f} | {r['var_diff']:.4f} | {g} |")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
