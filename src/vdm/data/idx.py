"""IDX files (MNIST, Fashion-MNIST): `read_idx`, `load_mnist`, `load_fashion_mnist` → N × 1 × 28 × 28 uint8."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from vdm.data.errors import DatasetError, check_split

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/)
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CHUNK = 1 << 20


def _read_exactly(f, n: int, path, what: str) -> bytes:
    """Read exactly ``n`` bytes in chunks (never allocates more than what the file holds)."""
    parts, got = [], 0
    while got < n:
        b = f.read(min(_CHUNK, n - got))
        if not b:
            raise DatasetError(path, f"truncated: {what} needs {n} bytes, the file holds only {got}")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not (detected from the
    content, not the name).  Returns the array in native byte order.

    The header is checked strictly: two zero bytes, a known type code, 1..255
    dimensions; the data must be exactly ``prod(dims) * itemsize`` bytes (a
    truncated file or trailing bytes are errors).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(path, "no such file")
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise DatasetError(path, f"truncated: IDX header needs 4 bytes, the file holds {len(magic)}")
            if magic[0] != 0 or magic[1] != 0:
                raise DatasetError(path, f"not an IDX file: magic number {magic.hex()} does not start with 0000")
            code, ndim = magic[2], magic[3]
            if code not in _IDX_DTYPES:
                raise DatasetError(path, f"unknown IDX data type code 0x{code:02x} (expected one of 08 09 0b 0c 0d 0e)")
            if ndim == 0:
                raise DatasetError(path, "IDX header says 0 dimensions")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DatasetError(path, f"truncated: IDX header declares {ndim} dimensions but ends inside them")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            dtype = _IDX_DTYPES[code]
            count = 1
            for d in dims:
                count *= d
            nbytes = count * dtype.itemsize
            if not gz:
                size = os.path.getsize(path)
                if size != 4 + 4 * ndim + nbytes:
                    have = size - 4 - 4 * ndim
                    what = "truncated" if have < nbytes else "trailing bytes"
                    raise DatasetError(
                        path, f"{what}: header says {dims} {dtype.name} = {nbytes} data bytes, the file holds {have}"
                    )
            data = _read_exactly(f, nbytes, path, f"data of shape {dims}")
            if f.read(1):
                raise DatasetError(path, f"trailing bytes after the {nbytes} data bytes of shape {dims}")
    except DatasetError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(path, f"corrupt or truncated file ({type(e).__name__}: {e})") from e
    arr = np.frombuffer(data, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        p = root / name
        if p.is_file():
            return p
    raise DatasetError(root / (stem + ".gz"), f"missing: neither {stem}.gz nor {stem} is in {root}")


def load_mnist(split: str, root: str | os.PathLike, *, return_labels: bool = False, _hint: str = ""):
    """MNIST-format (IDX) images of ``split`` ('train' or 't10k'/'test') from the
    folder ``root`` holding the standard file names (``train-images-idx3-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ... gzipped or not).

    Returns ``N x 1 x H x W`` uint8, or ``(images, labels)`` (labels: ``N`` uint8)
    with ``return_labels=True``.
    """
    split = "test" if split == "t10k" else split
    check_split(split, what="an IDX (MNIST-format) dataset")
    if root is None:
        raise DatasetError(None, "an IDX dataset needs root=<folder with the *-idx3-ubyte(.gz) files>")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "no such folder" + _hint)
    img_path = _find_idx(root, _MNIST_FILES[split][0])
    images = read_idx(img_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(img_path, f"expected N x H x W uint8 images, found {images.dtype} {images.shape}")
    images = np.ascontiguousarray(images[:, None])
    if not return_labels:
        return images
    lab_path = _find_idx(root, _MNIST_FILES[split][1])
    labels = read_idx(lab_path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(lab_path, f"expected N uint8 labels, found {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DatasetError(lab_path, f"{len(labels)} labels for {len(images)} images in {img_path.name}")
    return images, labels


def load_fashion_mnist(split: str, root: str | os.PathLike = FASHION_MNIST_ROOT, *, return_labels: bool = False):
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 grey images) from the
    Debian package ``dataset-fashion-mnist`` (or any folder with the same files).
    Returns ``N x 1 x 28 x 28`` uint8 (and labels with ``return_labels=True``)."""
    hint = "; install the Debian package: sudo apt-get update && sudo apt-get install dataset-fashion-mnist"
    if Path(root) != Path(FASHION_MNIST_ROOT):
        hint += f" (it puts the files in {FASHION_MNIST_ROOT})"
    return load_mnist(split, root, return_labels=return_labels, _hint=hint)
