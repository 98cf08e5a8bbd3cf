"""The periodic test bits per dimension of a run: a fixed subset of the test split, EMA weights, and the same
estimator as `vdm eval` (`vdm.evaluate.image_losses`, one draw per image with the noise of (seed, image))."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from vdm.evaluate import image_losses
from vdm.model import VDM
from vdm.seeding import derive_seed

_TEST = 5  # stream tag of the test noise


def fixed_subset(n_total: int, n: int) -> np.ndarray:
    """`n` indices spread evenly over `n_total` images (all of them when n ≥ n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, n).round().astype(np.int64)


class TestSubset:
    """Images whose draws are fixed once (by the seed), so successive evaluations differ only by the weights."""

    def __init__(self, images: Tensor, seed: int, batch_size: int):
        self.x = images
        self.batch_size = batch_size
        self.seed = derive_seed(seed, _TEST)

    def evaluate(self, model: VDM, precision: str = "fp32") -> dict[str, float]:
        """Mean test loss in bits per dimension over the subset, in the model's own time discretisation:
        {"test_bpd", "test_prior", "test_recon", "test_diff", "test_images"}; `precision` "fp32" or "bf16"."""
        terms = image_losses(model, self.x, steps=model.config.timesteps, time_samples=1,
                             batch_size=self.batch_size, seed=self.seed, progress=False, precision=precision)
        prior, recon, diff = terms.mean(0).tolist()
        return {"test_bpd": prior + recon + diff, "test_prior": prior, "test_recon": recon, "test_diff": diff,
                "test_images": len(self.x)}
