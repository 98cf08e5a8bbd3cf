"""The periodic test bits per dimension: a fixed subset of the test split with fixed noise, EMA weights."""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

from vdm.losses import bits_per_dim
from vdm.model import VDM
from vdm.precision import autocast
from vdm.train.batches import derive_seed, step_noise

_TEST = 5  # stream tag of the test noise


def fixed_subset(n_total: int, n: int) -> np.ndarray:
    """`n` indices spread evenly over `n_total` images (all of them when n ≥ n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, n).round().astype(np.int64)


class TestSubset:
    """Images and their (t, ε₀, ε) fixed once, so successive evaluations differ only by the weights."""

    def __init__(self, images: Tensor, seed: int, antithetic: bool, batch_size: int):
        self.x = images
        self.batch_size = batch_size
        shape = tuple(images.shape[1:])
        self.t, self.eps_0, self.eps = step_noise(derive_seed(seed, _TEST), 0, len(images), shape, antithetic)

    @torch.no_grad()
    def evaluate(self, model: VDM, precision: str = "fp32") -> dict[str, float]:
        """Mean test loss in bits per dimension: {"test_bpd", "test_prior", "test_recon", "test_diff"};
        `precision` "fp32" or "bf16" (autocast)."""
        was_training = model.training
        model.eval()
        dev = model.device
        sums = torch.zeros(3, dtype=torch.float64)
        try:
            with autocast(precision, dev):
                for b in range(0, len(self.x), self.batch_size):
                    sl = slice(b, b + self.batch_size)
                    out = model.loss(self.x[sl].to(dev), t=self.t[sl].to(dev), eps=self.eps[sl].to(dev),
                                     eps_0=self.eps_0[sl].to(dev))
                    terms = torch.stack([out["prior"], out["recon"], out["diff"]]).float()
                    sums += bits_per_dim(terms, model.num_dims(self.x)).sum(1).double().cpu()
        finally:
            model.train(was_training)
        prior, recon, diff = (sums / len(self.x)).tolist()
        return {"test_bpd": prior + recon + diff, "test_prior": prior, "test_recon": recon, "test_diff": diff}
