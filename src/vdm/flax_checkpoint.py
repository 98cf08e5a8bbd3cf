"""Read the official implementation's checkpoint files (flax MessagePack) without JAX, Flax or TensorFlow.

The official code saves its training state with `clu.checkpoint`, which writes `<prefix>.flax` beside
TensorFlow's own files: `flax.serialization.to_bytes(state)`, a MessagePack map with the keys `step`,
`params`, `ema_params` and `opt_state`. Parameter trees are nested maps (`score_model/conv_in/kernel`, ...);
every array is a MessagePack *extension* of type 1 whose payload is itself MessagePack:
`[shape (list of int), dtype name (str), raw little-endian bytes]`.

`read_parameters` streams the file and materialises only the one parameter tree it is asked for: the other
trees (the raw or EMA parameters, the two Adam moments) are skipped without being decoded.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import msgpack
import numpy as np

EXT_NDARRAY = 1  # flax _MsgpackExtType.ndarray
EXT_NAMES = {2: "a complex scalar (extension type 2)", 3: "a numpy scalar (extension type 3)"}
CHUNKED_KEY = "__msgpack_chunked_array__"  # flax's marker for arrays stored in chunks (over 2**30 bytes)
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
          "uint64", "bool")
MAX_BUFFER = 2**30 + 2**20  # flax stores any array over 2**30 bytes in chunks, so no payload is larger
TREES = ("ema_params", "params")


class FlaxCheckpointError(ValueError):
    """A file that is not an official VDM checkpoint; the message names the file and what was found."""


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """The `.flax` file meant by `path`: the file itself, a `clu` prefix such as `.../checkpoints-0` (whose
    file is `checkpoints-0.flax`), or a directory (its highest-numbered `*.flax`)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.flax"), key=_checkpoint_number)
        if not found:
            raise FlaxCheckpointError(f"{p}: directory holds no *.flax checkpoint file")
        return found[-1]
    if p.is_file():
        return p
    with_suffix = p.with_name(p.name + ".flax")
    if with_suffix.is_file():
        return with_suffix
    raise FlaxCheckpointError(f"{p}: no such file (nor {with_suffix.name})")


def _checkpoint_number(path: Path) -> tuple[int, str]:
    m = re.search(r"(\d+)$", path.stem)
    return (int(m.group(1)) if m else -1, path.name)


def read_parameters(path: str | os.PathLike, tree: str = "ema_params") -> tuple[int | None, dict[str, np.ndarray]]:
    """(training step, parameters) of an official checkpoint: the `tree` ("ema_params" or "params") flattened
    to '/'-joined paths with the leading `params/` of the official variable collection, e.g.
    `params/score_model/conv_in/kernel` → array. Raises `FlaxCheckpointError` for anything else."""
    if tree not in TREES:
        raise ValueError(f"tree must be one of {', '.join(TREES)}, got {tree!r}")
    path = resolve_checkpoint_path(path)
    step, params, keys = None, None, []
    try:
        with open(path, "rb") as fh:
            unpacker = msgpack.Unpacker(fh, raw=False, strict_map_key=True, ext_hook=_ext_hook(path),
                                        max_buffer_size=MAX_BUFFER)
            try:
                n = unpacker.read_map_header()
            except (ValueError, TypeError):
                raise FlaxCheckpointError(f"{path}: not a flax checkpoint (the file does not start with a "
                                          f"MessagePack map)") from None
            for _ in range(n):
                key = unpacker.unpack()
                keys.append(key)
                if key == "step":
                    step = _step(unpacker.unpack(), path)
                elif key == tree:
                    params = unpacker.unpack()
                else:
                    unpacker.skip()
            try:
                unpacker.skip()
            except msgpack.OutOfData:
                pass
            else:
                raise FlaxCheckpointError(f"{path}: not a flax checkpoint (data after the training state)")
    except msgpack.OutOfData:
        raise FlaxCheckpointError(f"{path}: truncated (the file ends inside the training state)") from None
    except OSError as e:
        raise FlaxCheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as e:
        if isinstance(e, FlaxCheckpointError):
            raise
        raise FlaxCheckpointError(f"{path}: not a valid flax checkpoint ({type(e).__name__}: {e})") from None
    if params is None:
        shown = ", ".join(repr(k) for k in keys[:8]) or "none"
        raise FlaxCheckpointError(f"{path}: not a VDM training state: no {tree!r} tree (top-level keys: {shown})")
    if not isinstance(params, dict) or "score_model" not in params:
        found = ", ".join(repr(k) for k in list(params)[:8]) if isinstance(params, dict) else type(params).__name__
        raise FlaxCheckpointError(f"{path}: not a VDM training state: {tree!r} holds {found}, "
                                  f"expected 'score_model' (and 'gamma')")
    return step, _flatten(params, "params", path)


def _ext_hook(path: Path):
    def hook(code: int, data: bytes):
        if code != EXT_NDARRAY:
            what = EXT_NAMES.get(code, f"an unknown extension type {code}")
            raise FlaxCheckpointError(f"{path}: holds {what}, which official VDM checkpoints never contain")
        return _ndarray(data, path)
    return hook


def _ndarray(data: bytes, path: Path) -> np.ndarray:
    try:
        item = msgpack.unpackb(data, raw=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise FlaxCheckpointError(f"{path}: corrupt array record ({e})") from None
    if not (isinstance(item, list) and len(item) == 3):
        raise FlaxCheckpointError(f"{path}: corrupt array record (expected [shape, dtype, bytes])")
    shape, dtype, buf = item
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise FlaxCheckpointError(f"{path}: corrupt array record (shape {shape!r})")
    if dtype not in DTYPES:
        raise FlaxCheckpointError(f"{path}: holds an array of dtype {dtype!r}; official VDM checkpoints hold "
                                  f"float32 arrays")
    if not isinstance(buf, bytes):
        raise FlaxCheckpointError(f"{path}: corrupt array record (data is {type(buf).__name__}, not bytes)")
    dt = np.dtype(dtype).newbyteorder("<")
    if len(buf) != math.prod(shape) * dt.itemsize:
        raise FlaxCheckpointError(f"{path}: corrupt array record ({len(buf)} bytes for a {dtype} array of "
                                  f"shape {tuple(shape)})")
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def _step(value, path: Path) -> int:
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu":
        return int(value.reshape(()))
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise FlaxCheckpointError(f"{path}: not a VDM training state (step is {value!r})")


def _flatten(tree: dict, prefix: str, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            if CHUNKED_KEY in value:
                raise FlaxCheckpointError(f"{path}: {name} is stored in chunks (an array over 2**30 bytes), "
                                          f"which official VDM checkpoints never contain")
            out |= _flatten(value, name, path)
        elif isinstance(value, np.ndarray):
            out[name] = value
        else:
            raise FlaxCheckpointError(f"{path}: not a VDM parameter tree: {name} is {type(value).__name__}, "
                                      f"not an array")
    return out
