"""A training step's batch as parts side by side on threads: each part's gradient on its own thread, summed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import torch
from torch import Tensor


def split_gradients(pool: Executor, part_terms: Callable[[int], Tensor], parts: int, params: Sequence[Tensor]
                    ) -> tuple[Tensor, list[Tensor | None]]:
    """Runs `part_terms(k)` for k = 0 … parts − 1 on the pool's threads: it computes part k's loss terms (any
    shape; their sum is the part's share of the step's loss) on the thread that calls it. Returns the terms
    summed over the parts and the gradient of the total loss for each of `params` (None where no part uses
    it). Sums run in part order, so a step gives the same bits every time whatever thread finishes first."""

    def one(k: int) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        terms = part_terms(k)
        return terms.detach(), torch.autograd.grad(terms.sum(), params, allow_unused=True)

    results = list(pool.map(one, range(parts)))
    terms = sum((r[0] for r in results[1:]), results[0][0])
    grads = []
    for i in range(len(params)):
        gs = [r[1][i] for r in results if r[1][i] is not None]
        grads.append(sum(gs[1:], gs[0]) if gs else None)
    return terms, grads
