"""Mutation fuzzing of the `.vdmc` decoder: every mutated file must decode to the original pixels or be refused
with `CodecFormatError` / `ModelMismatchError` — never another exception, never a hang, never wrong pixels.

Mutations of a valid file (seeded, reproducible): bit flips, byte overwrites, truncations, splices of two
files, inserted and deleted bytes, and forged header fields; each is tried both with the damaged checksum and
with the checksum recomputed (so that the parser and the entropy decoder are reached, not only the CRC check).
Used by `bench/fuzz_codec.py` (thousands of cases) and by a small seeded slice in the tests.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vdm.codec.compressor import ModelMismatchError, decompress_images
from vdm.codec.container import CodecFormatError

MUTATIONS = ("flip", "overwrite", "truncate", "splice", "insert", "delete", "forge")


@dataclass
class FuzzReport:
    cases: int = 0
    refused: int = 0  # CodecFormatError or ModelMismatchError
    exact: int = 0  # decoded to the original pixels
    crashes: list[str] = field(default_factory=list)  # any other exception: a bug
    wrong: list[str] = field(default_factory=list)  # decoded without error to other pixels: a bug
    slow: list[str] = field(default_factory=list)  # over the time limit: a potential hang
    by_mutation: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.wrong or self.slow)


def recrc(body: bytes) -> bytes:
    """`body` with its last 4 bytes replaced by the CRC-32 of the rest (a forger's checksum)."""
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def mutate(data: bytes, other: bytes, rng: np.random.Generator, kind: str) -> bytes:
    b = bytearray(data)
    n = len(b)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, 8 * n))
            b[pos // 8] ^= 1 << (pos % 8)
    elif kind == "overwrite":
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, n))] = int(rng.integers(0, 256))
    elif kind == "truncate":
        b = b[:int(rng.integers(0, n))]
    elif kind == "splice":
        cut = int(rng.integers(0, n))
        b = b[:cut] + bytearray(other[int(rng.integers(0, len(other))):])
    elif kind == "insert":
        pos = int(rng.integers(0, n + 1))
        b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    elif kind == "delete":
        pos = int(rng.integers(0, n))
        del b[pos:pos + int(rng.integers(1, 9))]
    elif kind == "forge":  # a header byte after the fingerprint set to a large or boundary value
        pos = int(rng.integers(21, min(n, 60)))
        b[pos] = int(rng.choice([0x00, 0x7F, 0x80, 0xFF]))
        if rng.random() < 0.5 and pos + 1 < n:
            b[pos + 1] = 0xFF
    else:
        raise ValueError(f"unknown mutation {kind!r}")
    return bytes(b)


def fuzz(files: Sequence[bytes], originals: Sequence[Sequence[np.ndarray]], model, cases: int, *, seed: int = 0,
         time_limit: float = 30.0, progress: Callable[[int], None] | None = None) -> FuzzReport:
    """Decode `cases` mutations of `files` (valid `.vdmc` files whose images are `originals`) with `model`."""
    rng = np.random.default_rng(seed)
    report = FuzzReport()
    t0 = time.perf_counter()
    for i in range(cases):
        j = int(rng.integers(0, len(files)))
        kind = MUTATIONS[int(rng.integers(0, len(MUTATIONS)))]
        body = mutate(files[j], files[(j + 1) % len(files)], rng, kind)
        fix_crc = rng.random() < 0.7 and len(body) >= 4
        if fix_crc:
            body = recrc(body)
        label = f"case {i}: {kind}{' + crc' if fix_crc else ''} of file {j}"
        report.cases += 1
        report.by_mutation[kind] += 1
        start = time.perf_counter()
        try:
            decoded = decompress_images(body, model)
        except (CodecFormatError, ModelMismatchError):
            report.refused += 1
        except Exception as e:  # noqa: BLE001 — any other exception is what this looks for
            report.crashes.append(f"{label}: {type(e).__name__}: {e}")
        else:
            same = len(decoded) == len(originals[j]) and all(
                d.pixels.shape == o.shape and np.array_equal(d.pixels, o) for d, o in zip(decoded, originals[j]))
            if same:
                report.exact += 1
            else:
                report.wrong.append(label)
        if time.perf_counter() - start > time_limit:
            report.slow.append(f"{label}: {time.perf_counter() - start:.1f} s")
        if progress:
            progress(1)
    report.seconds = time.perf_counter() - t0
    return report
