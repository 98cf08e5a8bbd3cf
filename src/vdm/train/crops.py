"""Random square crops with left–right flips from whole photographs: global batch `step` is a function of
(seed, step) alone, so a resumed run draws exactly the crops it would have drawn.

Per step, from a generator seeded with (seed, step): a crop size, uniform over the configured sizes; then per
crop a photograph (uniform over photographs, so a large one does not dominate), one of its scales that holds the
crop (uniform), a position (uniform) and a left–right flip (probability ½; natural photographs are as likely
mirrored, so the model is not told). The batch holds `batch_size · (base / size)²` crops (a multiple of the
number of processes), so every step has about the same number of pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vdm.seeding import derive_seed
from vdm.train.batches import _CROP


def batch_for_size(batch_size: int, base: int, size: int, world_size: int = 1) -> int:
    """Crops per global batch at `size`: batch_size·(base/size)² rounded down to a multiple of world_size
    (at least world_size)."""
    n = (batch_size * base * base) // (size * size)
    return max(world_size, n // world_size * world_size)


class CropSampler:
    """Global batches of random crops from `photos` ({name: [H×W×3 uint8 per scale]})."""

    def __init__(self, photos: dict[str, list[np.ndarray]], sizes: list[int], batch_size: int, base: int,
                 seed: int, world_size: int = 1):
        if not sizes:
            raise ValueError("no crop sizes given")
        self.names = list(photos)
        if not self.names:
            raise ValueError("no photographs to crop from")
        self.sizes = [int(s) for s in sizes]
        self.batch_size, self.base, self.seed, self.world_size = batch_size, base, seed, world_size
        # per size, per photograph: its scales that hold a crop of that size
        self.scales: dict[int, list[list[np.ndarray]]] = {}
        for s in self.sizes:
            fits = [[a for a in photos[n] if min(a.shape[:2]) >= s] for n in self.names]
            empty = [n for n, f in zip(self.names, fits) if not f]
            if empty:
                raise ValueError(f"crop size {s} is larger than every scale of {', '.join(empty)}")
            self.scales[s] = fits

    def batch(self, step: int) -> Tensor:
        """Global batch `step`: uint8 (B, 3, size, size), B = batch_for_size(...)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, _CROP, step))
        size = self.sizes[int(torch.randint(len(self.sizes), (), generator=g))]
        n = batch_for_size(self.batch_size, self.base, size, self.world_size)
        u = torch.rand(n, 5, generator=g, dtype=torch.float64).numpy()
        out = np.empty((n, size, size, 3), np.uint8)
        for i, (up, us, uy, ux, uf) in enumerate(u):
            scales = self.scales[size][min(int(up * len(self.names)), len(self.names) - 1)]
            img = scales[min(int(us * len(scales)), len(scales) - 1)]
            y = min(int(uy * (img.shape[0] - size + 1)), img.shape[0] - size)
            x = min(int(ux * (img.shape[1] - size + 1)), img.shape[1] - size)
            crop = img[y:y + size, x:x + size]
            out[i] = crop[:, ::-1] if uf < 0.5 else crop
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
