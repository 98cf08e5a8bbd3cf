"""Loaders for files on disk: IDX (MNIST / Fashion-MNIST), CIFAR-10 python
pickles (through a restricted unpickler), downsampled-ImageNet ``.npz`` batches
and folders of PNG/JPEG images.

Every loader returns ``N x C x H x W`` uint8 C-contiguous arrays.  Anything
missing, truncated or malformed raises :class:`vdm.data.DatasetError` naming
the file and the problem.  Only numpy and Pillow are used; torch is not imported.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from vdm.data.errors import DatasetError

__all__ = [
    "FASHION_MNIST_ROOT",
    "read_idx",
    "load_mnist",
    "load_fashion_mnist",
    "RestrictedUnpickler",
    "restricted_loads",
    "load_cifar10",
    "load_imagenet",
    "load_image_folder",
    "IMAGE_EXTENSIONS",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

_SPLITS = ("train", "test")


def _check_split(split: str, allowed=_SPLITS, what: str = "this dataset") -> str:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r} for {what}: use one of {', '.join(map(repr, allowed))}")
    return split


# --------------------------------------------------------------------------- IDX

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
    _check_split(split, what="an IDX (MNIST-format) dataset")
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


# --------------------------------------------------------------------- CIFAR-10


def _restricted_codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Python 3 writes bytes as _codecs.encode(str, 'latin1') in protocol <= 2 pickles.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return obj.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray as _ma
        from numpy._core import numeric as _num
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
        from numpy.core import numeric as _num  # type: ignore[no-redef]
    g: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _restricted_codecs_encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        g[(mod, "_reconstruct")] = _ma._reconstruct
    if hasattr(_num, "_frombuffer"):  # protocol-5 pickles of arrays
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            g[(mod, "_frombuffer")] = _num._frombuffer
    return g


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only plain data and numpy arrays.

    ``find_class`` refuses every global except the few needed to rebuild an
    ndarray: ``numpy.ndarray``, ``numpy.dtype``, ``numpy[._]core.multiarray._reconstruct``,
    ``numpy[._]core.numeric._frombuffer`` (protocol 5) and a wrapped
    ``_codecs.encode`` that only accepts ``(str, 'latin1')`` (how Python 3
    writes bytes in protocol-2 pickles).  Persistent ids are refused too.
    """

    _ALLOWED: dict[tuple[str, str], object] | None = None

    def find_class(self, module, name):
        allowed = type(self)._ALLOWED
        if allowed is None:
            allowed = type(self)._ALLOWED = _numpy_globals()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (only numpy array globals are allowed)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def restricted_loads(data: bytes, *, encoding: str = "bytes"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding='bytes'``
    like the CIFAR-10 reference code, so Python-2 pickles give ``bytes`` keys)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _parse_cifar_batch(raw: bytes, path: str):
    try:
        obj = restricted_loads(raw)
    except pickle.UnpicklingError as e:
        raise DatasetError(path, f"refused or malformed pickle: {e}") from e
    except Exception as e:  # truncated pickles raise EOFError, ValueError, ...
        raise DatasetError(path, f"malformed or truncated pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(path, f"expected a dict, the pickle holds a {type(obj).__name__}")

    def get(key: str):
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise DatasetError(path, f"no {key!r} entry (keys: {sorted(map(repr, obj))})")

    data, labels = get("data"), get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(path, f"'data' must be an N x 3072 uint8 array, found {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(path, f"'labels' is not a list of integers ({e})") from e
    if labels.shape != (len(data),):
        raise DatasetError(path, f"{labels.shape} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(path, f"labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _cifar_raw_batches(root: Path, names: list[str]):
    """Yield ``(display_path, raw_bytes)`` for each batch, from a folder or the tarball."""
    tar = None
    if root.is_file():
        tar = root
    elif root.is_dir():
        for d in (root / _CIFAR_DIR, root):
            if all((d / n).is_file() for n in names):
                for n in names:
                    p = d / n
                    yield str(p), p.read_bytes()
                return
        if (root / _CIFAR_TAR).is_file():
            tar = root / _CIFAR_TAR
        else:
            missing = [n for n in names if not (root / _CIFAR_DIR / n).is_file() and not (root / n).is_file()]
            raise DatasetError(
                root, f"no {_CIFAR_TAR} and no complete {_CIFAR_DIR}/ folder here (missing: {', '.join(missing)})"
            )
    else:
        raise DatasetError(root, "no such file or folder")
    try:
        with tarfile.open(tar, "r:*") as tf:
            members = {}
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if base in names and m.isfile():
                    members.setdefault(base, m)
            for n in names:
                if n not in members:
                    raise DatasetError(tar, f"the archive has no {_CIFAR_DIR}/{n}")
                f = tf.extractfile(members[n])
                yield f"{tar}:{members[n].name}", f.read()
    except DatasetError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(tar, f"corrupt or truncated archive ({type(e).__name__}: {e})") from e


def load_cifar10(split: str, root: str | os.PathLike, *, return_labels: bool = False):
    """CIFAR-10 ('train': data_batch_1..5, 'test': test_batch) from ``root``:
    ``cifar-10-python.tar.gz`` itself, a folder holding it, a folder holding
    ``cifar-10-batches-py/``, or that folder itself.  The pickles are read with
    :class:`RestrictedUnpickler` (never plain ``pickle.load``) and the tarball
    is read in memory (nothing is extracted).

    Returns ``N x 3 x 32 x 32`` uint8 (``data`` rows are channel-major R, G, B
    planes), or ``(images, labels)`` with ``return_labels=True``.
    """
    _check_split(split, what="CIFAR-10")
    if root is None:
        raise DatasetError(None, f"CIFAR-10 needs root=<{_CIFAR_TAR} or a folder with {_CIFAR_DIR}/>")
    imgs, labs = [], []
    for path, raw in _cifar_raw_batches(Path(root), _CIFAR_BATCHES[split]):
        x, y = _parse_cifar_batch(raw, path)
        imgs.append(x)
        labs.append(y)
    images = np.ascontiguousarray(np.concatenate(imgs))
    return (images, np.concatenate(labs)) if return_labels else images


# ----------------------------------------------------------- downsampled ImageNet


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
    _check_split(split, what=f"ImageNet{image_size}")
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


# ---------------------------------------------------------------- image folders

#: File name endings read by :func:`load_image_folder` (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _image_to_array(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.int64)
                if im.mode == "I" and a.max(initial=0) < 256:
                    a8 = a.astype(np.uint8)
                else:  # 16-bit: to 8 bits, rounded
                    a8 = ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
                im = Image.fromarray(a8, mode="L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)  # alpha over white
            im = im.convert("L" if channels == 1 else "RGB")
            a = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise DatasetError(path, f"image too large ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(path, f"unreadable or truncated image ({type(e).__name__}: {e})") from e
    return a[:, :, None] if a.ndim == 2 else a


def load_image_folder(
    root: str | os.PathLike,
    split: str = "all",
    *,
    image_size: int = 32,
    channels: int = 3,
):
    """Every PNG/JPEG under a folder (recursively, sorted by relative path), cut
    into non-overlapping ``image_size`` x ``image_size`` tiles in raster order
    (the bottom/right remainder is dropped; images smaller than a tile give none).

    ``split``: 'all' reads ``root`` itself; any other split ('train', 'test', ...)
    reads the sub-folder ``root/<split>`` and is an error if it does not exist
    (a folder is never silently reused as both train and test data).

    ``channels=3``: grey images are replicated to RGB; ``channels=1``: colour
    images are converted to luma (ITU-R 601-2, Pillow's "L").  Transparent
    pixels are composited over white; 16-bit images are scaled to 8 bits.

    Returns ``N x channels x image_size x image_size`` uint8.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if root is None:
        raise DatasetError(None, "a folder dataset needs root=<folder of PNG/JPEG images>")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "no such folder")
    folder = root if split == "all" else root / split
    if not folder.is_dir():
        raise DatasetError(folder, f"no such folder: split {split!r} reads {folder}; use split='all' to read {root}")
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise DatasetError(folder, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    from vdm.data.photos import tile_image

    tiles = []
    for p in files:
        a = _image_to_array(p, channels)
        t = tile_image(a, image_size)
        if len(t):
            tiles.append(t)
    if not tiles:
        raise DatasetError(folder, f"no image here is at least {image_size}x{image_size} pixels")
    return np.ascontiguousarray(np.concatenate(tiles).transpose(0, 3, 1, 2))
