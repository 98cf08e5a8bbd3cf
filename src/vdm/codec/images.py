"""Reading images to compress and writing decompressed ones: Pillow formats, `.npy` and `.npz` (uint8).

Every image becomes a uint8 array (H, W) (grey), (H, W, 1) (grey, arrays only) or (H, W, 3) (colour), with
a name: the file's base name, or `file.npz:key` for a member of an `.npz`. Decompressed images are written
back under their names: `.npy` and `.npz` members as arrays, everything else as PNG (lossless).
Unreadable or unsupported inputs raise `ImageReadError` naming the file; `.npy`/`.npz` are read without
pickle.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vdm.files import atomic_write

NPZ_SEP = ":"


class ImageReadError(ValueError):
    """An input file that cannot be read as uint8 images; the message names the file."""


def _check_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ImageReadError(f"{where}: arrays must be uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))):
        raise ImageReadError(f"{where}: arrays must be (H, W), (H, W, 1) or (H, W, 3), got shape {arr.shape}")
    if arr.size == 0:
        raise ImageReadError(f"{where}: empty image")
    return np.ascontiguousarray(arr)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise ImageReadError(f"{path}: animated/multi-frame images are not supported")
            if img.mode == "P" and "transparency" in img.info:
                raise ImageReadError(f"{path}: images with transparency are not supported")
            if img.mode == "1":
                img = img.convert("L")
            elif img.mode == "P":
                img = img.convert("RGB")
            if img.mode not in ("L", "RGB"):
                raise ImageReadError(f"{path}: image mode {img.mode} is not supported (use 8-bit grey or RGB)")
            return np.asarray(img, dtype=np.uint8).copy()
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e})") from None


def read_images(path: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """The images in one file as (name, uint8 array) pairs."""
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return [(path.name, _check_array(np.load(path, allow_pickle=False), str(path)))]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                items = [(f"{path.name}{NPZ_SEP}{k}", _check_array(z[k], f"{path}[{k}]")) for k in z.files]
            if not items:
                raise ImageReadError(f"{path}: holds no arrays")
            return items
    except ImageReadError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ImageReadError(f"{path}: not a readable uint8 array file ({e})") from None
    return [(path.name, _read_pillow(path))]


def output_name(name: str, index: int, arr: np.ndarray) -> tuple[str, str | None]:
    """(file name to write, npz member or None) for a decoded image; names are reduced to a base name."""
    base, member = name, None
    if NPZ_SEP in name and name.split(NPZ_SEP, 1)[0].lower().endswith(".npz"):
        base, member = name.split(NPZ_SEP, 1)
    base = Path(base.replace("\\", "/")).name
    if base in ("", ".", ".."):
        base = f"image_{index:04d}" + (".npy" if arr.ndim == 3 and arr.shape[2] == 1 else ".png")
    if member is not None and base.lower().endswith(".npz"):
        return base, member
    if base.lower().endswith(".npy"):
        return base, None
    return str(Path(base).with_suffix(".png")), None


def write_images(images: Sequence[tuple[str, np.ndarray]], outdir: str | os.PathLike, *,
                 force: bool = False) -> list[Path]:
    """Write decoded (name, array) pairs into `outdir` (created); returns the paths written.

    Every path is worked out first: if any exists and `force` is false, `FileExistsError` names them and nothing
    is written. Each file is written atomically (a partial file never appears under its name)."""
    outdir = Path(outdir)
    if not force:
        refuse_existing(images, outdir)
    plan = _plan(images)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, content in plan.items():
        path = outdir / fname
        atomic_write(path, lambda tmp, c=content, f=fname: _write_one(tmp, f, c))
        written.append(path)
    return written


def _plan(images: Sequence[tuple[str, np.ndarray]]) -> dict[str, object]:
    """File name → array, or {member: array} for an .npz, for decoded (name, array) pairs."""
    plan: dict[str, object] = {}
    for i, (name, arr) in enumerate(images):
        fname, member = output_name(name, i, arr)
        if member is not None:
            plan.setdefault(fname, {})[member] = arr
            continue
        stem, suffix, n = Path(fname).stem, Path(fname).suffix, 1
        while fname in plan:  # two inputs with one base name: keep both
            fname, n = f"{stem}_{n}{suffix}", n + 1
        plan[fname] = arr
    return plan


def planned_names(images: Sequence[tuple[str, np.ndarray]]) -> list[str]:
    """The file names `write_images` gives `images` ((name, array) pairs; the arrays are read only for their
    shapes), one per file written."""
    return list(_plan(images))


def refuse_existing(images: Sequence[tuple[str, np.ndarray]], outdir: str | os.PathLike) -> None:
    """`FileExistsError` naming the files that writing `images` ((name, array) pairs; the arrays are read only
    for their shapes) into `outdir` would overwrite."""
    existing = [Path(outdir) / f for f in planned_names(images) if (Path(outdir) / f).exists()]
    if existing:
        shown = ", ".join(str(p) for p in existing[:3]) + (" …" if len(existing) > 3 else "")
        raise FileExistsError(f"{shown} exist{'s' if len(existing) == 1 else ''}; pass --force to overwrite")


def _write_one(tmp: str, fname: str, content) -> None:
    if isinstance(content, dict):  # an .npz: one uncompressed .npy per member, whatever the member names
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for member, arr in content.items():
                with zf.open(f"{member}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    elif fname.lower().endswith(".npy"):
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(content), allow_pickle=False)
    else:
        from PIL import Image
        arr = content[:, :, 0] if content.ndim == 3 and content.shape[2] == 1 else content
        Image.fromarray(arr).save(tmp, format="PNG")
