"""CIFAR-10 python batches through a restricted unpickler (numpy arrays only): `load_cifar10` → N × 3 × 32 × 32."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from vdm.data.errors import DatasetError, check_split


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
    check_split(split, what="CIFAR-10")
    if root is None:
        raise DatasetError(None, f"CIFAR-10 needs root=<{_CIFAR_TAR} or a folder with {_CIFAR_DIR}/>")
    imgs, labs = [], []
    for path, raw in _cifar_raw_batches(Path(root), _CIFAR_BATCHES[split]):
        x, y = _parse_cifar_batch(raw, path)
        imgs.append(x)
        labs.append(y)
    images = np.ascontiguousarray(np.concatenate(imgs))
    return (images, np.concatenate(labs)) if return_labels else images
