"""Many images from one seed, in batches: `sample_images` draws images start … start + n − 1 of a seeded
sequence, `sample_to_files` writes them (`vdm sample`), resumable after an interruption."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vdm.checkpoint import model_fingerprint
from vdm.choices import DEFAULT_GRID, DEFAULT_SAMPLER, DEFAULT_STEPS
from vdm.files import atomic_write
from vdm.image_files import save_grid_png, save_npz
from vdm.model import VDM
from vdm.precision import autocast
from vdm.progress import progress_bar
from vdm.samplers import SAMPLERS, generate, prior_latent, time_grid
from vdm.seeding import image_generators


class ResumeError(ValueError):
    """A partial sampling folder made with other arguments than the ones given now."""


def sample_images(model: VDM, n: int, *, sampler: str = DEFAULT_SAMPLER, steps: int | None = None, seed: int = 0,
                  grid: str | None = None, batch: int = 64, start: int = 0,
                  image_size: int | tuple[int, int] | None = None, progress: bool = False,
                  precision: str = "fp32", conditioning: float = 0.0, **options) -> Tensor:
    """Images start … start + n − 1 of the seeded sequence: image i starts from z_1 drawn with the generator
    of (seed, i), which also draws its sampling noise, so an image depends on (seed, i, sampler settings) only,
    not on `batch` or on which other images are drawn (the ode sampler: up to its tolerance). uint8
    (n, C, H, W). `steps` and `grid` default to `DEFAULT_STEPS` / `DEFAULT_GRID` of the sampler. `precision`
    "bf16" runs the network under bfloat16 autocast; `conditioning` is the network's conditioning input (0 for
    un-augmented images of an augmentation-conditioned model, and for every other model)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be at least 1, got {n} and {batch}")
    steps = steps if steps is not None else DEFAULT_STEPS[sampler]
    times = [1.0, 0.0] if sampler == "ode" else time_grid(model, steps, grid or DEFAULT_GRID[sampler])
    out = []
    with autocast(precision, model.device):
        for b in range(start, start + n, batch):
            gens = image_generators(seed, range(b, min(b + batch, start + n)), model.device)
            z_1 = prior_latent(model, len(gens), image_size=image_size, generator=gens)
            cond = torch.full((len(gens),), float(conditioning), dtype=model.dtype, device=model.device)
            out.append(generate(model, z_1, sampler, times, conditioning=cond, generator=gens, progress=progress,
                                **options).cpu())
    return torch.cat(out)


def sample_to_files(model: VDM, out_png: str | os.PathLike, n: int, *, batch: int = 64, settings: dict,
                    nrow: int | None = None, grid_images: int = 256, progress: bool = True) -> np.ndarray:
    """Draw `n` images with `sample_images(**settings)` in batches, writing each finished batch atomically to
    the folder OUT.partial/ (beside OUT.png); a rerun with the same model and settings continues from the
    batches already there, and one with anything different is refused (`ResumeError`). At the end writes
    OUT.npz (`arr_0`: uint8 N×H×W×C, the layout FID tools read) and the PNG grid of the first `grid_images`
    images (when C is 1 or 3), removes the partial folder and returns the images (N, C, H, W)."""
    out_png = Path(out_png)
    parts = out_png.with_name(out_png.stem + ".partial")
    record = {"model": model_fingerprint(model).hex(), "n": int(n), "batch": int(batch), **settings}
    done = _resume(parts, record)
    batches = list(range(0, n, batch))
    bar = progress_bar(progress, desc="images", unit="img", total=n, initial=min(done * batch, n))
    for k in range(done, len(batches)):
        b = batches[k]
        images = sample_images(model, min(batch, n - b), start=b, batch=batch, **settings).numpy()
        atomic_write(parts / f"batch_{k:06d}.npy", lambda tmp: _save_npy(tmp, images))
        bar.update(len(images))
    bar.close()
    images = np.concatenate([np.load(parts / f"batch_{k:06d}.npy", allow_pickle=False)
                             for k in range(len(batches))])
    save_npz(images, out_png.with_suffix(".npz"))
    if images.shape[1] in (1, 3):
        save_grid_png(images[:grid_images], out_png, nrow=nrow)
    shutil.rmtree(parts)
    return images


def _resume(parts: Path, record: dict) -> int:
    """The number of finished batches in `parts` (creating it with `record` when absent); refuses a folder
    whose record differs."""
    meta = parts / "settings.json"
    if not meta.exists():
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(record, sort_keys=True)))
        return 0
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{meta}: unreadable ({e}); delete {parts} to start again") from None
    if recorded != json.loads(json.dumps(record)):
        diff = sorted(k for k in set(recorded) | set(record) if recorded.get(k) != record.get(k))
        raise ResumeError(f"{parts} holds a run with other arguments ({', '.join(diff)} differ); rerun with the "
                          f"same ones to resume, or delete it to start again")
    done = 0
    while (parts / f"batch_{done:06d}.npy").exists():
        done += 1
    return done


def _save_npy(tmp: str, a: np.ndarray) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a bare name
        np.save(fh, a, allow_pickle=False)
