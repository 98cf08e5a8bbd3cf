"""Encoding speed of `vdm compress` on one and two threads: torch's own threads inside each network evaluation
(the codec before the thread pool) against the codec's thread pool (a stage's evaluations side by side, one torch
thread each). Encodes `--tiles` held-out test tiles into one file at T = `--steps`, twice per setting, and prints
pixels per second and whether the payloads agree (they must, for the same thread count: the count is part of the
header, which keys the masks).

    python bench/codec_threads.py --tiles 64 --steps 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vdm.codec import CodingParams, compress_images, compressor, read_header
from vdm.data import load_dataset
from vdm.pretrained import load_default_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    model = load_default_model().eval()
    tiles = load_dataset("photos", "test")
    pick = np.linspace(0, len(tiles) - 1, args.tiles).round().astype(int)
    images = [np.ascontiguousarray(t.transpose(1, 2, 0)) for t in tiles[pick]]
    pooled = compressor._Network.__init__

    def unpooled(self, *a, **k):
        pooled(self, *a, **k)
        self.pool = None

    payloads: dict[int, set] = {}
    print(f"{args.tiles} test tiles 32×32, T = {args.steps}, {torch.__version__}")
    for label, threads, init in (("1 thread", 1, pooled), ("2 torch threads per evaluation", 2, unpooled),
                                 ("2 threads, thread pool (default)", 2, pooled)) * 2:
        compressor._Network.__init__ = init
        start = time.perf_counter()
        data = compress_images(images, model, CodingParams(steps=args.steps, threads=threads))
        seconds = time.perf_counter() - start
        payloads.setdefault(threads, set()).add(bytes(read_header(data).payload.tobytes()))
        print(f"{label}: {args.tiles * 1024 / seconds:,.0f} pixels/s", flush=True)
    compressor._Network.__init__ = pooled
    print("payloads identical per thread count:", all(len(v) == 1 for v in payloads.values()))


if __name__ == "__main__":
    main()
