"""Stateless samplers for VDM and writers for the images they make.

Every sampler is a function of the model and its starting latent with no hidden state:
`ancestral_sample(model, z_1, steps, *, generator=None)`. The generator supplies all the noise, so a seeded
generator gives the same images as `VDM.sample` with the same seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vdm import process
from vdm.files import atomic_write
from vdm.model import VDM
from vdm.precision import autocast


def uniform_times(steps: int) -> list[float]:
    """The grid t_i = (T − i)/T, i = 0..T, from 1 down to 0 (the times `VDM.sample` uses)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [(steps - i) / steps for i in range(steps + 1)]


def prior_latent(model: VDM, n: int, *, image_size: int | tuple[int, int] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """z_1 ~ N(0, I) of shape (n, C, H, W) in the model's dtype and device (H = W = config.image_size)."""
    size = image_size or model.config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    shape = (n, model.config.channels, h, w)
    return torch.randn(shape, generator=generator, device=model.device, dtype=model.dtype)


@torch.no_grad()
def ancestral_sample_times(model: VDM, z_1: Tensor, times: Sequence[float], *,
                           generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Ancestral sampling along a decreasing time grid, then the decoder's most likely image.

    For consecutive times t > s of `times` (which starts at 1 and ends at 0) draws z_s ~ p(z_s | z_t) =
    q(z_s | z_t, x = x̂(z_t; t)) (paper, section 3.2; `process.ancestral_step`), then returns
    argmax_x p(x | z_0) as integers (uint8 when V ≤ 256), shaped like `z_1`. Runs in eval mode.
    """
    times = [float(t) for t in times]
    if len(times) < 2 or any(s >= t for t, s in zip(times, times[1:])):
        raise ValueError("times must be strictly decreasing with at least two entries")
    was_training = model.training
    model.eval()
    try:
        z = z_1.to(device=model.device, dtype=model.dtype)
        kw = dict(dtype=z.dtype, device=z.device)
        pairs = list(zip(times, times[1:]))
        if progress:
            from tqdm.auto import tqdm
            pairs = tqdm(pairs, desc="sampling", unit="step")
        for t, s in pairs:
            gamma_t, gamma_s = model.gamma(torch.tensor(t, **kw)), model.gamma(torch.tensor(s, **kw))
            noise = torch.randn(z.shape, generator=generator, **kw)
            eps_hat = model.eps_hat(z, gamma_t)
            z = process.ancestral_step(z, eps_hat, gamma_s, gamma_t, noise)
        x = model.decode(z)
    finally:
        model.train(was_training)
    return x.to(torch.uint8) if model.config.vocab_size <= 256 else x


def ancestral_sample(model: VDM, z_1: Tensor, steps: int, *, generator: torch.Generator | None = None,
                     progress: bool = False) -> Tensor:
    """`steps` ancestral steps on the uniform grid 1, (T−1)/T, …, 0 from `z_1`; integer images (n, C, H, W)."""
    return ancestral_sample_times(model, z_1, uniform_times(steps), generator=generator, progress=progress)


def sample_images(model: VDM, n: int, steps: int, *, seed: int | None = None,
                  image_size: int | tuple[int, int] | None = None, progress: bool = False,
                  precision: str = "fp32") -> Tensor:
    """`n` images from z_1 ~ N(0, I) with `steps` ancestral steps; a seed gives the images of
    `model.sample(n, steps, torch.Generator(model.device).manual_seed(seed))` (in fp32; `precision` "bf16"
    runs the network under bfloat16 autocast)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    z_1 = prior_latent(model, n, image_size=image_size, generator=generator)
    with autocast(precision, model.device):
        return ancestral_sample(model, z_1, steps, generator=generator, progress=progress)


# --- writing images ---------------------------------------------------------------------------------------
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
    """Write images as a compressed .npz holding one uint8 (N, C, H, W) array under the key "images"."""
    a = _as_uint8(images)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
            np.savez_compressed(fh, images=a)

    atomic_write(path, write)


def load_npz(path: str | os.PathLike) -> np.ndarray:
    """The uint8 (N, C, H, W) array stored under "images" by `save_npz` (never unpickles)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as d:
            a = d["images"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not an image .npz with an 'images' array ({e})") from None
    if a.dtype != np.uint8 or a.ndim != 4:
        raise ValueError(f"{path}: 'images' must be uint8 (N, C, H, W), got {a.dtype} {a.shape}")
    return a
