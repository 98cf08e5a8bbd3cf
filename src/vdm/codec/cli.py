"""`vdm compress` and `vdm decompress`: lossless image compression with bits-back coding (thin CLI layer)."""

from __future__ import annotations

import time
from pathlib import Path

from vdm.errors import InputError, check_input_file, check_output_dir, check_output_file
from vdm.files import atomic_write

DEFAULTS_NOTE = ("The defaults (T = 200 steps, a σ/4 grid, 32-pixel tiles, warm-up pieces down to 8×8) were chosen "
                 "from measurements of rate against speed with bench/compress.py; docs/measurements.md gives "
                 "the measured rates.")


def register(subparsers) -> None:
    from vdm.codec.container import SNR_SPACING_MIN_STEPS, SPACINGS, CodingParams
    d = CodingParams()
    p = subparsers.add_parser(
        "compress", help="losslessly compress images into one .vdmc file (bits-back coding with a VDM)",
        description="Compress PNG (or other lossless Pillow formats), uint8 .npy or .npz images into one .vdmc "
                    "file with bits-back ANS coding through the model's T-step latent chain. Prints the rate in "
                    "bits per sub-pixel, headers and initial bits included. " + DEFAULTS_NOTE)
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files (.png, .npy, .npz, ...)")
    p.add_argument("-o", "--output", required=True, help="the .vdmc file to write")
    p.add_argument("--force", action="store_true",
                   help="overwrite the output file if it exists (default: refuse, before compressing)")
    _model_args(p)
    p.add_argument("--steps", type=int, default=d.steps, help=f"T, discrete steps of the chain (default {d.steps})")
    p.add_argument("--grid-bits", type=int, default=d.grid_bits,
                   help=f"latents are quantised to σ_t·2^-k; this is k (default {d.grid_bits})")
    p.add_argument("--spacing", choices=tuple(SPACINGS), default="auto",
                   help="how the T steps are spaced: snr weights them by how much each noise level still hides "
                        "(0.75 %% smaller files at T = 200 on 64 held-out tiles), t evenly in time; "
                        f"auto (default): snr for T ≥ {SNR_SPACING_MIN_STEPS}, else t")
    p.add_argument("--variance", choices=("fitted", "posterior"), default="fitted",
                   help="the reverse steps' variance: fitted (default) to the model's error at each noise level, "
                        "measured on the images and recorded in the file (most of the gain at few steps: "
                        "bench/reverse_variance.py), or the forward posterior's")
    p.add_argument("--tile", type=int, default=d.tile, help=f"tile side in pixels, 0 = whole images (default {d.tile})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="smallest side of the pieces the first tiles are cut into while the ANS stack is too small to lend a "
                        f"whole tile's bits; 0 = no warm-up (default {d.warmup})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"tiles per network call (default {d.batch})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's): a stage's network evaluations run side by side, one "
                        "torch thread each; recorded as the decoder's default. The file decodes to the same pixels "
                        "with any thread count, CPU or GPU")
    p.add_argument("--conditioning", type=float, default=d.conditioning, metavar="C",
                   help="the network's conditioning input, recorded in the file: 0 (default) for every model but "
                        "augmentation-conditioned ones (official cifar10_aug), where 0 means un-augmented images")
    p.set_defaults(func=compress_command)

    q = subparsers.add_parser(
        "decompress", help="decompress a .vdmc file into images",
        description="Decode a .vdmc file with the model that made it (checked by fingerprint) and write its "
                    "images into a directory: arrays as .npy/.npz, everything else as PNG. Damaged files and "
                    "files made with another model are refused. Any machine decodes the file exactly: the coding "
                    "network computes with exact integer sums (see docs/format.md), so the CPU, its instruction set, "
                    "the thread count and the torch version do not change the pixels.")
    q.add_argument("input", metavar="FILE", help="the .vdmc file")
    q.add_argument("-o", "--output", required=True, help="directory to write the images into")
    q.add_argument("--force", action="store_true",
                   help="overwrite images that already exist in the directory (default: refuse, before decoding)")
    q.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the number recorded by the encoder, at most this machine's cores); "
                        "any gives the same pixels")
    _model_args(q)
    q.set_defaults(func=decompress_command)


def _model_args(p) -> None:
    p.add_argument("--model", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="model file, checkpoint or run directory (default: the packaged pretrained model; "
                        "decompress picks the packaged model that made the file)")
    p.add_argument("--device", default="cpu", help="torch device for the network (default cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _load(args, fingerprint: bytes | None = None):
    """The model of --model; without it the packaged default, or, given a file's `fingerprint`, the packaged
    model that made the file."""
    if args.model is None:
        from vdm.pretrained import load_default_model, load_packaged_model
        if fingerprint is not None:
            return load_packaged_model(fingerprint, map_location=args.device)
        return load_default_model(map_location=args.device)
    from vdm.checkpoint import load_model
    return load_model(args.model, map_location=args.device)


def compress_command(args) -> int:
    import torch
    from vdm.codec.compressor import compress_images
    from vdm.codec.container import SPACINGS, CodingParams
    from vdm.codec.images import read_images
    check_output_file(args.output, args.force, "-o")
    try:
        params = CodingParams(args.steps, args.grid_bits, args.tile, args.warmup, args.batch,
                              args.threads or torch.get_num_threads(), args.conditioning,
                              spacing=SPACINGS[args.spacing],
                              error_knots=None if args.variance == "fitted" else ())
    except ValueError as e:
        raise InputError(f"coding parameters: {e}") from None
    items = [item for path in args.inputs for item in read_images(check_input_file(path))]
    model = _load(args)
    t0 = time.perf_counter()
    try:
        data = compress_images([a for _, a in items], model, params, [n for n, _ in items], progress=not args.quiet)
    except ValueError as e:  # images, tiles or channels the model cannot code, refused before any coding
        raise InputError(str(e)) from None
    seconds = time.perf_counter() - t0
    atomic_write(args.output, lambda tmp: Path(tmp).write_bytes(data))
    subpixels = sum(a.size for _, a in items)
    pixels = sum(a.shape[0] * a.shape[1] for _, a in items)
    print(f"{len(items)} image(s), {subpixels} sub-pixels -> {len(data)} bytes: "
          f"{8 * len(data) / subpixels:.4f} bits per sub-pixel ({pixels / seconds:.0f} pixels/s)")
    return 0


def decompress_command(args) -> int:
    from vdm.codec.compressor import decompress_images
    from vdm.codec.container import read_header
    from vdm.codec.images import write_images
    if args.threads is not None and not 1 <= args.threads <= 256:
        raise InputError(f"--threads must lie in 1..256, got {args.threads}")
    data = check_input_file(args.input).read_bytes()
    header = read_header(data)  # refuse a damaged file before loading any model
    check_output_dir(args.output, "-o")  # and every output, before spending time decoding
    for path in output_paths(header, args.output):
        check_output_file(path, args.force, "-o")
    model = _load(args, header.fingerprint)
    images = decompress_images(data, model, progress=not args.quiet, threads=args.threads)
    paths = write_images([(im.name, im.pixels) for im in images], args.output, force=args.force)
    print(f"{len(images)} image(s) written to {args.output}: " + ", ".join(p.name for p in paths[:8])
          + (" ..." if len(paths) > 8 else ""))
    return 0


def output_paths(header, outdir: str | Path) -> list[Path]:
    """The files decoding the images of `header` (a `read_header` result) writes into `outdir`."""
    import numpy as np
    from vdm.codec.images import planned_names
    shapes = [(im.height, im.width) + (() if im.mode == 0 else (im.channels,)) for im in header.images]
    return [Path(outdir) / name for name in
            planned_names([(im.name, np.broadcast_to(np.uint8(0), shape)) for im, shape in zip(header.images, shapes)])]
