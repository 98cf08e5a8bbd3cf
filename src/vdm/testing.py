"""Helpers for the tests and benchmarks, not used by vdm itself: synthetic files in the official checkpoints'
format (flax's MessagePack `to_bytes` layout, read by `vdm.flax_checkpoint`)."""

from __future__ import annotations

import msgpack
import numpy as np

from vdm.flax_checkpoint import EXT_NDARRAY


def nest(flat: dict[str, np.ndarray]) -> dict:
    """The nested parameter tree of '/'-joined paths, the inverse of the flattening in
    `vdm.flax_checkpoint.read_parameters` (a leading `params/` is dropped, as in the official files)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.removeprefix("params/").split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def pack_array(obj):
    """msgpack `default` hook writing a numpy array as flax does: extension type 1 holding
    [shape, dtype name, raw bytes]."""
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(EXT_NDARRAY, msgpack.packb([list(obj.shape), obj.dtype.name, obj.tobytes()]))
    raise TypeError(f"cannot write {type(obj).__name__} into a flax checkpoint")
