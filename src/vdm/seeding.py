"""Seeds derived from tuples of integers: every random stream of vdm is named by such a tuple.

`derive_seed(seed, tag, i, …)` mixes the integers through numpy's SeedSequence, so nearby tuples ((seed, 0)
and (seed, 1), or (seed, 1, 2) and (seed, 2, 1)) give unrelated streams, on every platform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def derive_seed(*words: int) -> int:
    """A 64-bit seed from the integers `words` (two 32-bit words of numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def seeded_generator(*words: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded with `derive_seed(*words)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*words))


def image_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu"
                     ) -> list[torch.Generator]:
    """One generator per image, seeded with (seed, index): image i's z_1 and sampling noise depend on nothing
    else (not on the batch size, the batch it falls in, or the sampler)."""
    return [seeded_generator(seed, i, device=device) for i in indices]
