"""Lossless compression benchmark: vdm (bits-back) against PNG, WebP lossless and JPEG XL lossless.

Whole photos (default): bits per sub-pixel of each codec on the held-out test photos, plus encode and decode
speed in pixels per second; every codec's output is decoded and checked to be exact. Prints a markdown table.

    python bench/compress.py --limit 1 --crop 96           # quick: one photo, centre 96×96 crop
    python bench/compress.py --model runs/compress          # all test photos, whole
    python bench/compress.py --photos rocket,flower         # some of them, by name
    python bench/compress.py --tiles 64 --steps 50          # net rate vs −ELBO_T on 64 test tiles

`--tiles N` codes N test tiles (32×32, evenly spread over the test split) into one file and prints its net rate
(file size in bits over sub-pixels: header, initial bits and checksum included) next to the model's negative
discrete-time ELBO for the same T (mean over the same tiles, with its standard error).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time

import numpy as np
import torch


def test_photos() -> dict[str, np.ndarray]:
    """The held-out test photos (H, W, 3) uint8, from vdm.data, or straight from skimage/sklearn."""
    try:
        from vdm.data import embedded_photos
        return embedded_photos("test")
    except ImportError:
        import skimage.data
        from sklearn.datasets import load_sample_image
        left, right = skimage.data.stereo_motorcycle()[:2]
        return {"coffee": skimage.data.coffee(), "rocket": skimage.data.rocket(), "motorcycle_left": left,
                "motorcycle_right": right, "flower": load_sample_image("flower.jpg")}


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    if size <= 0:
        return img
    h, w = img.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(img[y:y + size, x:x + size])


def _pillow(img: np.ndarray, fmt: str, **kw) -> tuple[bytes, float, float]:
    from PIL import Image
    t0 = time.perf_counter()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    t1 = time.perf_counter()
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(Image.fromarray(img).mode))
    t2 = time.perf_counter()
    assert np.array_equal(back, img), f"{fmt} is not lossless here"
    return buf.getvalue(), t1 - t0, t2 - t1


def _jxl(img: np.ndarray) -> tuple[bytes, float, float]:
    import imagecodecs
    t0 = time.perf_counter()
    data = imagecodecs.jpegxl_encode(img, lossless=True, effort=9)
    t1 = time.perf_counter()
    back = imagecodecs.jpegxl_decode(data)
    t2 = time.perf_counter()
    assert np.array_equal(back, img), "JPEG XL is not lossless here"
    return data, t1 - t0, t2 - t1


def _vdm(img: np.ndarray, model, params, decode: bool = True) -> tuple[bytes, float, float]:
    from vdm.codec import compress_images, decompress_images
    t0 = time.perf_counter()
    data = compress_images([img], model, params, progress=True)
    t1 = time.perf_counter()
    if not decode:
        return data, t1 - t0, float("nan")
    back = decompress_images(data, model, progress=True)[0].pixels
    t2 = time.perf_counter()
    assert np.array_equal(back, img), "vdm round trip failed"
    return data, t1 - t0, t2 - t1


def load(args):
    if args.model:
        from vdm.checkpoint import load_model
        return load_model(args.model)
    from vdm.pretrained import load_default_model
    return load_default_model()


def params_from(args):
    from vdm.codec import CodingParams
    from vdm.codec.container import SPACINGS
    return CodingParams(args.steps, args.grid_bits, args.tile, args.warmup, args.batch,
                        args.threads or torch.get_num_threads(), spacing=SPACINGS[args.spacing],
                        error_knots=None if args.variance == "fitted" else ())


def bench_photos(args) -> None:
    every = test_photos()
    if args.photos:
        names = args.photos.split(",")
        unknown = [n for n in names if n not in every]
        if unknown:
            raise SystemExit(f"compress.py: no test photo {', '.join(unknown)} (there are {', '.join(every)})")
        every = {n: every[n] for n in names}
    photos = list(every.items())[:args.limit or None]
    photos = [(n, centre_crop(p, args.crop)) for n, p in photos]
    codecs = {"PNG (optimize)": lambda im: _pillow(im, "PNG", optimize=True),
              "WebP lossless (method 6)": lambda im: _pillow(im, "WEBP", lossless=True, method=6),
              "JPEG XL lossless (effort 9)": _jxl}
    if not args.no_vdm:
        model, params = load(args), params_from(args)
        codecs[f"vdm (T={params.steps}, grid σ/2^{params.grid_bits}, tile {params.tile})"] = \
            lambda im: _vdm(im, model, params, decode=not args.no_decode)
    totals = {name: [0, 0.0, 0.0] for name in codecs}
    subpixels = sum(p.size for _, p in photos)
    pixels = sum(p.shape[0] * p.shape[1] for _, p in photos)
    per_image = []
    for pname, img in photos:
        row = [pname, f"{img.shape[1]}×{img.shape[0]}"]
        for cname, fn in codecs.items():
            data, enc, dec = fn(img)
            t = totals[cname]
            t[0] += len(data); t[1] += enc; t[2] += dec
            row.append(f"{8 * len(data) / img.size:.3f}")
        per_image.append(row)
        print(f"{pname}: " + ", ".join(row[2:]), file=sys.stderr, flush=True)
    print(f"\n{len(photos)} test photo(s), {pixels} pixels, {subpixels} sub-pixels"
          + (f" (centre crops {args.crop}×{args.crop})" if args.crop else "") + "\n")
    print("| codec | bits per sub-pixel | encode (pixels/s) | decode (pixels/s) |")
    print("|---|---|---|---|")
    for cname, (size, enc, dec) in totals.items():
        decode = "not run (--no-decode)" if math.isnan(dec) else f"{pixels / dec:,.0f}"
        print(f"| {cname} | {8 * size / subpixels:.3f} | {pixels / enc:,.0f} | {decode} |")
    print("\n| photo | size | " + " | ".join(codecs) + " |")
    print("|---|---|" + "---|" * len(codecs))
    for row in per_image:
        print("| " + " | ".join(row) + " |")


def bench_tiles(args) -> None:
    from vdm.codec import compress_images, decompress_images, read_header
    from vdm.codec.compressor import coding_chain
    from vdm.evaluate import image_losses
    from vdm.testing import recorded_stage_bits
    from vdm.data import load_dataset
    model, params = load(args), params_from(args)
    tiles = load_dataset("photos", "test")
    pick = np.linspace(0, len(tiles) - 1, args.tiles).round().astype(int)
    x = tiles[pick]  # (N, 3, 32, 32)
    images = [np.ascontiguousarray(t.transpose(1, 2, 0)) for t in x]
    t0 = time.perf_counter()
    with recorded_stage_bits() as stage_bits:
        data = compress_images(images, model, params, progress=True)
    t1 = time.perf_counter()
    exact = "not checked (--no-decode)"
    if not args.no_decode:
        out = decompress_images(data, model, progress=True)
        exact = all(np.array_equal(a, b.pixels) for a, b in zip(images, out))
    t2 = time.perf_counter()
    c = read_header(data)
    D = x.size
    # −ELBO_T per tile in bits/dim: T stratified draws per tile hit every step of the chain once
    g = coding_chain(model, c.params).gamma
    elbo = image_losses(model, x, time_samples=params.steps, seed=args.seed, batch_size=256, gammas=g).sum(1)
    even = None
    if params.spacing != 0:  # also the evenly spaced chain's, for comparison
        even = image_losses(model, x, steps=params.steps, time_samples=params.steps, seed=args.seed,
                            batch_size=256).sum(1)
    net = 8 * len(data) / D
    print(f"\n{len(x)} test tiles 32×32×3 ({D} sub-pixels), T = {params.steps}, grid σ/2^{params.grid_bits}, "
          f"warm-up pieces down to {params.warmup}×{params.warmup}, {len(c.stages)} stages; round trip exact: {exact}\n")
    print("| quantity | bits per sub-pixel |")
    print("|---|---|")
    print(f"| net rate (whole file: header, initial bits, checksum) | {net:.4f} |")
    print(f"| of which initial and top-up bits (fresh random words) | {32 * (c.seed_words + sum(c.topups)) / D:.4f} |")
    print(f"| of which header + checksum | {8 * (len(data) - 4 * len(c.payload)) / D:.4f} |")
    spacing = {0: "even in t", 1: "SNR-weighted"}[params.spacing]
    print(f"| negative ELBO_T of the chain with the posterior's variances, T = {params.steps}, {spacing} (± s.e.) | "
          f"{elbo.mean():.4f} ± {elbo.std(ddof=1) / math.sqrt(len(elbo)):.4f} |")
    print(f"| net rate / negative ELBO | {net / elbo.mean():.4f} |")
    if even is not None:
        print(f"| negative ELBO_T, T = {params.steps} even in t (posterior variances; ± standard error) | "
              f"{even.mean():.4f} ± {even.std(ddof=1) / math.sqrt(len(even)):.4f} |")
        print(f"| net rate / that | {net / even.mean():.4f} |")
    stage_table(model, params, x, c, stage_bits, g, args.seed)
    print(f"\nencode {D / 3 / (t1 - t0):,.0f} pixels/s" + ("" if args.no_decode else
                                                             f", decode {D / 3 / (t2 - t1):,.0f} pixels/s"))


def stage_table(model, params, x: np.ndarray, c, stage_bits: list[int], gammas: np.ndarray, seed: int) -> None:
    """Where the bits go: each stage's net code length against the −ELBO_T of the pieces it coded (the warm-up's
    quadrants included), for the warm-up stages (those with pieces smaller than a tile) and the rest."""
    from vdm.codec import tiling
    from vdm.evaluate import image_losses
    C = model.config.channels
    images = list(x)
    units = tiling.replay_units(tiling.plan_units([t.shape for t in images], C, params.tile), params.warmup,
                                c.splits)
    elbo_bits = np.zeros(len(units))
    for idx in tiling.shape_groups(units):
        pieces = np.stack([tiling.extract(images, units[j], C) for j in idx])
        bpd = image_losses(model, pieces, time_samples=params.steps, seed=seed, batch_size=256, gammas=gammas,
                           progress=False).sum(1)
        elbo_bits[idx] = bpd * pieces[0].size
    ends = np.cumsum(c.stages)
    rows = {"warm-up stages": [0, 0, 0.0, 0.0], "the other stages": [0, 0, 0.0, 0.0]}
    for si, (end, size) in enumerate(zip(ends, c.stages)):
        stage = range(end - size, end)
        warm = any(units[j].h * units[j].w < params.tile ** 2 for j in stage)
        r = rows["warm-up stages" if warm else "the other stages"]
        r[0] += 1
        r[1] += sum(C * units[j].h * units[j].w for j in stage)
        r[2] += stage_bits[si]
        r[3] += float(elbo_bits[list(stage)].sum())
    print("\n| stages | count | sub-pixels | net bits per sub-pixel (no top-up words) | −ELBO_T of their pieces | "
          "ratio |\n|---|---|---|---|---|---|")
    for name, (n, dims, bits, elbo) in rows.items():
        if n:
            print(f"| {name} | {n} | {dims} | {bits / dims:.4f} | {elbo / dims:.4f} | {bits / elbo:.4f} |")


def main(argv=None) -> int:
    from vdm.codec import CodingParams
    from vdm.codec.container import SPACINGS
    d = CodingParams()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model file/checkpoint/run (default: the packaged model)")
    p.add_argument("--steps", type=int, default=d.steps, help="T")
    p.add_argument("--grid-bits", type=int, default=d.grid_bits, help="latent grid σ_t·2^-k")
    p.add_argument("--tile", type=int, default=d.tile, help="tile side (0 = whole images)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up tile side")
    p.add_argument("--spacing", choices=tuple(SPACINGS), default="auto", help="the chain's step spacing")
    p.add_argument("--variance", choices=("fitted", "posterior"), default="fitted",
                   help="the reverse steps' variance (vdm compress --variance)")
    p.add_argument("--batch", type=int, default=d.batch, help="tiles per network call")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--limit", type=int, default=0, help="only the first N photos")
    p.add_argument("--photos", default="", help="only these test photos (comma-separated names, e.g. coffee,rocket)")
    p.add_argument("--crop", type=int, default=0, help="centre crop of this side (0 = whole photos)")
    p.add_argument("--no-vdm", action="store_true", help="only the classical codecs")
    p.add_argument("--tiles", type=int, default=0, help="code N test tiles and compare with the ELBO")
    p.add_argument("--no-decode", action="store_true", help="skip vdm's decode (and its exactness check)")
    p.add_argument("--seed", type=int, default=0, help="seed of the ELBO estimate")
    args = p.parse_args(argv)
    if args.tiles:
        bench_tiles(args)
    else:
        bench_photos(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
