"""Files of generated images: a PNG grid to look at, and an .npz in the layout FID tools read.

(`vdm.codec.images` reads and writes the images of `vdm compress`/`decompress` instead: any Pillow format,
under their own names.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from vdm.files import atomic_write


def _as_uint8(images: np.ndarray | Tensor) -> np.ndarray:
    a = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer) or a.min(initial=0) < 0 or a.max(initial=0) > 255:
            raise ValueError(f"images must be integers in 0..255, got dtype {a.dtype}")
        a = a.astype(np.uint8)
    return a


def make_grid(images: np.ndarray | Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) uint8 images into one (rows·(H+p)+p, nrow·(W+p)+p, C) array, `nrow` images a row
    (default ⌈√N⌉), separated and framed by `padding` black pixels; rows = ⌈N/nrow⌉."""
    a = _as_uint8(images)
    n, c, h, w = a.shape
    if c not in (1, 3):
        raise ValueError(f"a PNG grid needs 1 or 3 channels, got {c}")
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / nrow))
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = a[k].transpose(1, 2, 0)
    return grid


def save_grid_png(images: np.ndarray | Tensor, path: str | os.PathLike, nrow: int | None = None,
                  padding: int = 2) -> None:
    """Write the grid of `make_grid` as an 8-bit PNG (grey for C = 1, RGB for C = 3)."""
    from PIL import Image

    grid = make_grid(images, nrow, padding)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_npz(images: np.ndarray | Tensor, path: str | os.PathLike) -> None:
    """Write (N, C, H, W) images as a compressed .npz holding one uint8 N×H×W×C array under "arr_0" (the layout
    FID tools such as the guided-diffusion evaluator and torch-fidelity read)."""
    a = _as_uint8(images).transpose(0, 2, 3, 1)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
            np.savez_compressed(fh, arr_0=a)

    atomic_write(path, write)


def load_npz(path: str | os.PathLike) -> np.ndarray:
    """The images written by `save_npz` ("arr_0", N×H×W×C) as uint8 (N, C, H, W); never unpickles."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as d:
            a = d["arr_0"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not an image .npz with an 'arr_0' array ({e})") from None
    if a.dtype != np.uint8 or a.ndim != 4:
        raise ValueError(f"{path}: 'arr_0' must be uint8 (N, H, W, C), got {a.dtype} {a.shape}")
    return a.transpose(0, 3, 1, 2)
