"""The deterministic data order and noise streams: everything a step draws is a function of (seed, step).

Data: the training set is read as an endless stream of epochs, epoch e being the permutation of the N images
drawn from a generator seeded with (seed, e). Global batch s is positions [s·B, (s+1)·B) of that stream, so
the data position of a run is just its step, and a resumed run sees exactly the batches it would have seen.

Noise: step s draws the times t, ε₀ and ε of the whole *global* batch from a generator seeded with
(seed, step); each process then keeps its slice. The noise of an example therefore does not depend on how the
global batch is split across processes, and one process with batch B computes the same loss as k processes
with batch B/k each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vdm import losses
from vdm.seeding import derive_seed

# Stream tags, so the seeds of different uses never collide.
_DATA, _NOISE, _DROPOUT, _INIT, _AUGMENT, _CROP, _DROPOUT_PART = 1, 2, 3, 4, 5, 6, 7


def init_seed(seed: int) -> int:
    """The seed of the initial weights."""
    return derive_seed(seed, _INIT)


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The seed of torch's global generator (dropout) for process `rank` at `step`."""
    return derive_seed(seed, _DROPOUT, rank, step)


def part_dropout_seed(seed: int, rank: int, step: int, part: int) -> int:
    """The seed of the dropout generator of part `part` of process `rank`'s batch at `step` (run.split > 1)."""
    return derive_seed(seed, _DROPOUT_PART, rank, step, part)


class BatchOrder:
    """Indices of global batch `step` of size `batch_size` over `n` images (epoch permutations from `seed`)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need at least one image and a positive batch size (n={n}, batch={batch_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._cache: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Tensor:
        """The order of the n images in `epoch` (int64 (n,))."""
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            g = torch.Generator().manual_seed(derive_seed(self.seed, _DATA, epoch))
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def indices(self, step: int) -> Tensor:
        """Image indices of global batch `step` (int64 (batch_size,)); may straddle two or more epochs."""
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            m = epochs == e
            out[m] = self.permutation(e)[pos[m] % self.n]
        return out

    def epoch(self, step: int) -> float:
        """Epochs completed before `step` (fractional)."""
        return step * self.batch_size / self.n


def step_noise(seed: int, step: int, batch_size: int, shape: tuple[int, ...], antithetic: bool,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(t (B,), ε₀ (B, *shape), ε (B, *shape)) of the global batch at `step`, float32 on `device`.

    t is antithetic over the global batch, t_j = (u + j/B) mod 1, when `antithetic`, else i.i.d. U(0, 1).
    The draws come from a generator on `device` seeded with (seed, step): the same on every process.
    """
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, _NOISE, step))
    if antithetic:
        t = losses.antithetic_times(batch_size, generator=g, device=device)
    else:
        t = torch.rand(batch_size, generator=g, device=device)
    eps_0 = torch.randn((batch_size, *shape), generator=g, device=device)
    eps = torch.randn((batch_size, *shape), generator=g, device=device)
    return t, eps_0, eps


def augment_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the augmentation draws of global batch `step` (the same on every process)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, _AUGMENT, step))
