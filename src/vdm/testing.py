"""Helpers for the tests and benchmarks, not used by vdm itself: synthetic files in the official checkpoints'
format (flax's MessagePack `to_bytes` layout, read by `vdm.flax_checkpoint`), and where a `.vdmc` file's bits go
(`recorded_stage_bits`)."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def recorded_stage_bits():
    """Within: a list that receives, when the block ends, each coded stage's net code length in bits (what its
    bits-back pass added to the stack, top-up words not counted), in coding order. A stage coded again with more
    top-up words counts once, with its last attempt. Wraps `bitsback.push_words` and `bitsback.encode_stage`."""
    from vdm.codec import bitsback
    push_words, encode_stage, attempts, opened = bitsback.push_words, bitsback.encode_stage, {}, {}

    def pushing(coder, words):  # outside a stage's pass: its top-up words, pushed just before it
        if id(coder) not in opened:
            opened[id(coder)] = coder.num_bits() + 32 * len(words)
        push_words(coder, words)

    def recording(coder, chain, eps_fn, groups, *args, **kwargs):
        opened.setdefault(id(coder), coder.num_bits())  # a stage without top-up words
        low = encode_stage(coder, chain, eps_fn, groups, *args, **kwargs)
        attempts[id(groups)] = (groups, coder.num_bits() - opened.pop(id(coder)))  # groups held: ids not reused
        return low

    out: list[int] = []
    bitsback.push_words, bitsback.encode_stage = pushing, recording
    try:
        yield out
    finally:
        bitsback.push_words, bitsback.encode_stage = push_words, encode_stage
        out.extend(bits for _, bits in attempts.values())
