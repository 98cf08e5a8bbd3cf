"""`vdm eval`, `vdm sample`, `vdm plot`: thin command-line wrappers around evaluate, sampling and plot."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from vdm.checkpoint import CheckpointError, load_model, resolve_model_path
from vdm.precision import PRECISIONS, resolve_precision

NATIVE_SIZE_DATASETS = ("fashion_mnist", "mnist", "cifar10", "imagenet32", "imagenet64")
TARGET_HELP = "a model file (.safetensors), a checkpoint directory or a run directory (uses checkpoints/best)"


def register(subparsers) -> None:
    _register_eval(subparsers)
    _register_sample(subparsers)
    _register_plot(subparsers)


# --- shared helpers ---------------------------------------------------------------------------------------
class CommandError(Exception):
    """A user-facing failure: printed as one line on stderr, exit code 2."""


def _fail(msg: str) -> int:
    print(f"vdm: error: {msg}", file=sys.stderr)
    return 2


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT", help=TARGET_HELP)
    p.add_argument("--device", default=_default_device(), help="torch device (default: %(default)s)")


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast where the hardware has native bf16 (CPU with AVX-512 "
                        "BF16 or AMX, CUDA compute capability ≥ 8.0), else fp32; bf16 elsewhere is emulated "
                        "(slow) and warns")


def _precision(args) -> str:
    return resolve_precision(args.precision, args.device).precision


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="dataset name (default: the run's saved config, else 'photos'); see vdm.data")
    p.add_argument("--data-root", default=None, help="dataset files (default: the run's saved config)")
    p.add_argument("--split", default="test", help="dataset split (default: %(default)s)")


def _add_conditioning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conditioning", type=float, default=0.0, metavar="C",
                   help="the network's conditioning input: 0 (default) for un-augmented images; models trained "
                        "with augmentation conditioning (e.g. the official cifar10_aug) took 1 for augmented ones")


def _load(target: str, device: str):
    try:
        return load_model(target, map_location=device)
    except CheckpointError as e:
        raise CommandError(str(e)) from None


def run_dir_of(target: str | Path) -> Path | None:
    """The run directory a model file, checkpoint directory or run directory belongs to, if any."""
    p = Path(target).resolve()
    for d in (p, p.parent, p.parent.parent, p.parent.parent.parent):
        if (d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file():
            return d
    return None


def run_config(target: str | Path) -> dict:
    """The resolved training config saved as config.json in the checkpoint directory of `target` or in its
    run directory (the nearest one wins); {} when there is none or it is not a JSON object."""
    p = Path(target).resolve()
    d = p if p.is_dir() else p.parent
    for folder in (d, d.parent, d.parent.parent):
        try:
            cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(cfg, dict):
            return cfg
    return {}


def data_defaults(cfg: dict) -> tuple[str | None, str | None]:
    """(dataset name, root) from a run config: {"data": {"name"|"dataset", "root"}}, {"dataset": ...} or flat
    keys "dataset"/"data"/"data_root"/"root"."""
    for d in (cfg.get("data"), cfg.get("dataset"), cfg):
        if not isinstance(d, dict):
            continue
        name = next((d[k] for k in ("name", "dataset", "data") if isinstance(d.get(k), str)), None)
        root = next((d[k] for k in ("root", "data_root") if isinstance(d.get(k), str)), None)
        if name:
            return name, root
    return None, None


def load_images(args, model, *, limit: int | None = None):
    """The images to evaluate on: (array, dataset name), sized for `model`."""
    from vdm.data import DatasetError, load_dataset

    cfg_name, cfg_root = data_defaults(run_config(args.target))
    name = args.data or cfg_name or "photos"
    root = args.data_root if args.data_root is not None else (cfg_root if name == cfg_name else None)
    kw = {} if name in NATIVE_SIZE_DATASETS else {"image_size": model.config.image_size}
    try:
        x = load_dataset(name, args.split, root=root, channels=model.config.channels, **kw)
    except (DatasetError, ValueError, OSError) as e:
        raise CommandError(f"dataset {name!r} ({args.split}): {e}") from None
    if x.shape[1] != model.config.channels:
        raise CommandError(f"dataset {name!r} has {x.shape[1]} channels, the model {model.config.channels}")
    if limit is not None and limit < len(x):  # spread evenly over the split (tiles of one photo are adjacent)
        x = x[np.linspace(0, len(x) - 1, limit).round().astype(np.int64)]
    if len(x) == 0:
        raise CommandError(f"dataset {name!r} ({args.split}) holds no images")
    return x, name


def _guarded(fn):
    def wrapper(args) -> int:
        try:
            return fn(args)
        except CommandError as e:
            return _fail(str(e))
    return wrapper


# --- vdm eval ---------------------------------------------------------------------------------------------
def _register_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="test-set bits per dimension (negative VLB) of a trained model",
        description="Estimate the negative VLB in bits per dimension on a dataset split: per image the mean "
                    "over K (time, noise) draws, then the mean over images with its standard error. "
                    "Continuous time by default; --steps T gives the T-step discrete-time bound.")
    _add_common(p)
    _add_data(p)
    p.add_argument("--steps", type=int, default=0, help="T for the discrete-time loss; 0 = continuous (default)")
    p.add_argument("--time-samples", type=int, default=1, metavar="K",
                   help="(time, noise) draws per image, stratified in t (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="network batch (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use N images spread evenly over the split")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    _add_precision(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text line")
    _add_conditioning(p)
    p.set_defaults(func=_guarded(cmd_eval))


def cmd_eval(args) -> int:
    from vdm.evaluate import evaluate, format_result

    if args.steps < 0 or args.time_samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise CommandError("--steps must be ≥ 0; --time-samples, --batch-size and --limit ≥ 1")
    model = _load(args.target, args.device)
    x, name = load_images(args, model, limit=args.limit)
    r = evaluate(model, x, steps=args.steps, time_samples=args.time_samples, batch_size=args.batch_size,
                 seed=args.seed, progress=True, precision=_precision(args), conditioning=args.conditioning)
    if args.json:
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        out.update(data=name, split=args.split, seed=args.seed,
                   checkpoint=str(resolve_model_path(args.target)))
        print(json.dumps(out))
    else:
        print(format_result(r) + f" ({name}, {args.split})")
    return 0


# --- vdm sample -------------------------------------------------------------------------------------------
def _register_sample(sub) -> None:
    p = sub.add_parser(
        "sample", help="draw images with the ancestral sampler",
        description="Draw N images from z_1 ~ N(0, I) with T ancestral steps and write a PNG grid plus the "
                    "raw images as FILE.npz (uint8 N×C×H×W under 'images') beside it. Seeded: the same "
                    "seed gives the same images on the same device.")
    _add_common(p)
    p.add_argument("-n", "--num", type=int, default=16, help="number of images (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1000, help="ancestral steps T (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--out", default="samples.png", help="output PNG grid (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="H = W (default: the model's)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: ⌈√N⌉)")
    _add_precision(p)
    p.set_defaults(func=_guarded(cmd_sample))


def cmd_sample(args) -> int:
    from vdm.sampling import sample_images, save_grid_png, save_npz

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out must name a .png file, got {out}")
    if args.num < 1 or args.steps < 1 or (args.image_size is not None and args.image_size < 1):
        raise CommandError("-n, --steps and --image-size must be positive")
    model = _load(args.target, args.device)
    images = sample_images(model, args.num, args.steps, seed=args.seed, image_size=args.image_size,
                           progress=True, precision=_precision(args))
    npz = out.with_suffix(".npz")
    if images.shape[1] in (1, 3):
        save_grid_png(images, out, nrow=args.nrow)
    else:
        print(f"note: {images.shape[1]} channels, no PNG grid written", file=sys.stderr)
    save_npz(images, npz)
    print(f"wrote {args.num} samples ({args.steps} steps, seed {args.seed}) to {out} and {npz}")
    return 0


# --- vdm plot ---------------------------------------------------------------------------------------------
def _register_plot(sub) -> None:
    p = sub.add_parser(
        "plot", help="PNG figures of a run: training curve, schedule, diffusion-loss integrand",
        description="Write training_curve.png (train and test bpd against step, from metrics.jsonl), "
                    "schedule.png (γ(t) and log-SNR = −γ(t)) and diffusion_integrand.png (½·γ'(t)·"
                    "E‖ε − ε̂‖²/D against t on a few test images). Needs matplotlib: pip install 'vdm[plot]'.")
    _add_common(p)
    _add_data(p)
    p.add_argument("--out", default=None, help="output folder (default: RUN/plots)")
    p.add_argument("--images", type=int, default=8,
                   help="test images for the integrand, spread over the split (default: %(default)s)")
    p.add_argument("--points", type=int, default=32, help="times t for the integrand (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.set_defaults(func=_guarded(cmd_plot))


def cmd_plot(args) -> int:
    from vdm.plot import MetricsError, plot_run, pyplot

    try:
        pyplot()
    except ImportError as e:
        raise CommandError(str(e)) from None
    if args.images < 0 or args.points < 1:
        raise CommandError("--images must be ≥ 0 and --points ≥ 1")
    model = _load(args.target, args.device)
    run = run_dir_of(args.target)
    target = Path(args.target)
    out = Path(args.out) if args.out else (run or (target if target.is_dir() else target.parent)) / "plots"
    metrics = run / "metrics.jsonl" if run is not None and (run / "metrics.jsonl").is_file() else None
    if metrics is None:
        print("note: no metrics.jsonl found, no training curve", file=sys.stderr)
    data = load_images(args, model, limit=args.images)[0] if args.images else None
    try:
        written = plot_run(model, out, metrics=metrics, data=data, points=args.points, seed=args.seed)
    except MetricsError as e:
        raise CommandError(str(e)) from None
    for path in written:
        print(f"wrote {path}")
    return 0
