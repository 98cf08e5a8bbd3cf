"""The model's bound on the whole held-out photos, per photo: the continuous-time negative VLB of every tile.

Cuts each of the 5 held-out test photos into `--tile`-pixel tiles (`vdm.data.tile_image`: every whole tile, flat
ones included, unlike the test split; the bottom and right remainders are left out) and evaluates each tile's
negative VLB in bits per dimension (`--draws` draws of t, ε and ε₀ per tile; the draws depend only on (seed, tile
index), so every model sees the same ones). What a bits-back file of the photo approaches as T grows, before the
chain's discretisation and the codec's own overhead (`bench/compress.py`). With several models, also their
paired differences against the first.

    python bench/photo_bound.py src/vdm/pretrained/compress_v2.safetensors src/vdm/pretrained/compress.safetensors
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model files / checkpoints / runs")
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=1, help="draws of (t, ε) per tile, averaged (stratified in t): "
                   "one draw leaves a Monte Carlo error of about 0.1 bits/dim on a photo's mean; use 10 or more "
                   "for absolute figures (paired differences need fewer)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    from vdm.checkpoint import load_model
    from vdm.data import embedded_photos, tile_image
    from vdm.evaluate import image_losses
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = embedded_photos("test")
    tiles = [np.ascontiguousarray(tile_image(img, args.tile).transpose(0, 3, 1, 2)) for img in photos.values()]
    x = np.concatenate(tiles)
    bounds = []
    for path in args.models:
        bpd = image_losses(load_model(path).eval(), x, time_samples=args.draws, batch_size=128, seed=args.seed,
                           progress=False).sum(1)
        bounds.append(bpd)
    se = lambda v: v.std(ddof=1) / math.sqrt(len(v))  # noqa: E731
    print(f"{len(x)} tiles of {args.tile}×{args.tile} from {len(photos)} whole test photos; continuous-time "
          f"negative VLB, bits per dimension ({args.draws} draw(s) per tile, seed {args.seed})\n")
    print("| photo | tiles | " + " | ".join(args.models) + " |")
    print("|---|---|" + "---|" * len(args.models))
    start = 0
    for name, t in zip(photos, tiles):
        part = slice(start, start + len(t))
        print(f"| {name} | {len(t)} | " + " | ".join(f"{b[part].mean():.4f}" for b in bounds) + " |")
        start += len(t)
    print(f"| **all** | {len(x)} | " + " | ".join(f"{b.mean():.4f} ± {se(b):.4f}" for b in bounds) + " |")
    for path, b in zip(args.models[1:], bounds[1:]):
        d = b - bounds[0]
        print(f"\npaired difference {path} − {args.models[0]}: {d.mean():+.4f} ± {se(d):.4f} bits/dim")


if __name__ == "__main__":
    main()
