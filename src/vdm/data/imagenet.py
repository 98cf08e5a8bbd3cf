"""Downsampled ImageNet `.npz` batches (Chrabaszcz et al. 2017), read without pickle: `load_imagenet`."""

from __future__ import annotations

import fnmatch
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from vdm.data.errors import DatasetError, check_split


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)] + [str(p)]


def _npz_member_header(path: Path, key: str):
    """Shape and dtype of ``key`` in an .npz without loading it."""
    with zipfile.ZipFile(path) as zf:
        try:
            f = zf.open(key + ".npy")
        except KeyError:
            raise DatasetError(path, f"no {key!r} array (arrays: {[n[:-4] for n in zf.namelist()]})") from None
        with f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def _imagenet_files(root: Path, split: str) -> list[Path]:
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data*.npz"
    if root.is_file():  # one batch file serves only the split its official name says it holds
        if not fnmatch.fnmatch(root.name, pattern):
            raise DatasetError(root, f"split {split!r} reads files named {pattern}; pass the folder of batches "
                                     f"or the file of that split")
        return [root]
    if not root.is_dir():
        raise DatasetError(root, "no such file or folder")
    files = sorted(root.rglob(pattern), key=_natural_key)
    if not files:
        raise DatasetError(root, f"no {pattern} file in this folder (or below it)")
    return files


def load_imagenet(split: str, root: str | os.PathLike, image_size: int, *, return_labels: bool = False):
    """Downsampled ImageNet (Chrabaszcz et al. 2017) ``.npz`` batches, read with
    ``np.load(allow_pickle=False)``.

    ``root`` is one ``.npz`` file of the split (named as below) or a folder searched
    recursively for ``train_data_batch_<k>.npz`` (split 'train', in numeric
    order) or ``val_data*.npz`` (split 'test' or 'val').  Each file holds
    ``data`` (``N x 3*S*S`` uint8, channel-major) and ``labels``.

    Returns ``N x 3 x S x S`` uint8 with ``S = image_size`` (or ``(images, labels)``).
    """
    split = "test" if split == "val" else split
    check_split(split, what=f"ImageNet{image_size}")
    if root is None:
        raise DatasetError(None, f"ImageNet{image_size} needs root=<folder of .npz batches or one .npz>")
    files = _imagenet_files(Path(root), split)
    s = int(image_size)
    row = 3 * s * s
    # First pass: headers only, to allocate the output once.
    counts = []
    for p in files:
        try:
            shape, dtype = _npz_member_header(p, "data")
        except DatasetError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise DatasetError(p, f"not a valid .npz file ({type(e).__name__}: {e})") from e
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != row:
            raise DatasetError(p, f"'data' must be N x {row} uint8 (3x{s}x{s} channel-major), found {dtype} {shape}")
        counts.append(shape[0])
    out = np.empty((sum(counts), 3, s, s), np.uint8)
    labels = np.empty(sum(counts), np.int64) if return_labels else None
    pos = 0
    for p, n in zip(files, counts):
        try:
            with np.load(p, allow_pickle=False) as z:
                data = z["data"]
                lab = z["labels"] if return_labels else None
        except KeyError as e:
            raise DatasetError(p, f"missing array {e}") from e
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
            raise DatasetError(p, f"corrupt or truncated .npz ({type(e).__name__}: {e})") from e
        if data.shape != (n, row) or data.dtype != np.uint8:
            raise DatasetError(p, f"'data' changed while reading: {data.dtype} {data.shape}")
        out[pos : pos + n] = data.reshape(n, 3, s, s)
        if return_labels:
            lab = np.asarray(lab).reshape(-1)
            if len(lab) != n or lab.dtype.kind not in "iu":
                raise DatasetError(p, f"'labels' must be {n} integers, found {lab.dtype} {lab.shape}")
            labels[pos : pos + n] = lab
        pos += n
    return (out, labels) if return_labels else out
