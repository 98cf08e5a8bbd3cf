"""Fuzz the `.vdmc` decoder with thousands of mutated files (bit flips, truncations, splices, inserted and
deleted bytes, forged header fields; checksums recomputed for most, so the parser and the entropy decoder are
reached). Passes when there are 0 crashes, 0 slow cases (a potential hang) and 0 wrong pixels returned without
an error.

    python bench/fuzz_codec.py [--cases 10000] [--seed 0] [--packaged]

By default the files are made with a small random model (fast); --packaged uses the packaged compression model.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from vdm import VDM
from vdm.codec import CodingParams, compress_images
from vdm.codec.fuzz import fuzz


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packaged", action="store_true", help="use the packaged model (slower per case)")
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds after which a case counts as a hang")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.packaged:
        from vdm.pretrained import load_default_model
        model, params = load_default_model(), CodingParams(steps=4, tile=16, warmup=8, batch=8, threads=1)
    else:
        torch.manual_seed(0)
        model = VDM(n_embd=32, n_layer=1, image_size=8, dropout=0.0).eval()
        params = CodingParams(steps=2, grid_bits=2, tile=8, warmup=4, batch=4, threads=1)
    rng = np.random.default_rng(args.seed)
    originals = [[rng.integers(0, 256, (13, 10, 3), dtype=np.uint8), rng.integers(0, 256, (9, 7), dtype=np.uint8)],
                 [rng.integers(90, 120, (16, 16, 3), dtype=np.uint8)],
                 [rng.integers(0, 256, (5, 6, 1), dtype=np.uint8)] * 3]
    files = [compress_images(imgs, model, params, names=[f"im{i}.png" for i in range(len(imgs))])
             for imgs in originals]
    with tqdm(total=args.cases, desc="fuzzing", unit="file") as bar:
        r = fuzz(files, originals, model, args.cases, seed=args.seed, time_limit=args.time_limit,
                 progress=bar.update)
    print(f"{r.cases} mutated files ({', '.join(f'{k} {v}' for k, v in sorted(r.by_mutation.items()))}) "
          f"in {r.seconds:.0f} s: {r.refused} refused with a clear error, {r.exact} decoded exactly (harmless "
          f"mutations), {len(r.crashes)} crashes, {len(r.slow)} over {args.time_limit:.0f} s, "
          f"{len(r.wrong)} wrong pixels returned")
    for line in (r.crashes + r.slow + r.wrong)[:20]:
        print("  " + line)
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
