"""`vdm eval`, `vdm sample`, `vdm plot`: thin command-line wrappers around evaluate, sampling and plot."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vdm.choices import DEFAULT_GRID, DEFAULT_SAMPLER, DEFAULT_STEPS, GRIDS, PRECISIONS, SAMPLER_NAMES
from vdm.errors import InputError, check_output_dir, check_output_file

NATIVE_SIZE_DATASETS = ("fashion_mnist", "mnist", "cifar10", "imagenet32", "imagenet64")
TARGET_HELP = "a model file (.safetensors), a checkpoint directory or a run directory (uses checkpoints/best)"


def register(subparsers) -> None:
    _register_eval(subparsers)
    _register_sample(subparsers)
    _register_plot(subparsers)


# --- shared helpers ---------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, optional_help: str | None = None) -> None:
    """The model argument and --device; with `optional_help` the model may be left out (what then is used)."""
    if optional_help is None:
        p.add_argument("target", metavar="RUN_OR_CHECKPOINT", help=TARGET_HELP)
    else:
        p.add_argument("target", metavar="RUN_OR_CHECKPOINT", nargs="?", default=None,
                       help=f"{TARGET_HELP}; {optional_help}")
    p.add_argument("--device", default="auto", help="torch device: cpu, cuda, cuda:1, … (default: auto, CUDA when "
                   "available)")


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast where the hardware has native bf16 (CPU with AVX-512 "
                        "BF16 or AMX, CUDA compute capability ≥ 8.0), else fp32; bf16 elsewhere is emulated "
                        "(slow) and warns")


def _precision(args) -> str:
    from vdm.precision import resolve_precision
    return resolve_precision(args.precision, _device(args.device)).precision


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    from vdm.checkpoint import CheckpointError, load_model
    try:
        return load_model(target, map_location=_device(device))
    except CheckpointError as e:
        raise InputError(str(e)) from None


def _packaged_sampling_model() -> str:
    from vdm.pretrained import SAMPLING_MODEL, PretrainedMissingError, default_model_path
    try:
        return str(default_model_path(SAMPLING_MODEL))
    except PretrainedMissingError as e:
        raise InputError(str(e)) from None


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


def load_images(args, model, *, limit: int | None = None, spread: bool = False):
    """The images to evaluate on: (array, dataset name), sized for `model`; with `limit`, the first N of the
    split, or N spread evenly over it when `spread` (the photo split keeps a photo's tiles together)."""
    from vdm.data import DatasetError, load_dataset

    cfg_name, cfg_root = data_defaults(run_config(args.target))
    name = args.data or cfg_name or "photos"
    root = args.data_root if args.data_root is not None else (cfg_root if name == cfg_name else None)
    kw = {} if name in NATIVE_SIZE_DATASETS else {"image_size": model.config.image_size}
    try:
        x = load_dataset(name, args.split, root=root, channels=model.config.channels, **kw)
    except (DatasetError, ValueError, OSError) as e:
        raise InputError(f"dataset {name!r} ({args.split}): {e}") from None
    if x.shape[1] != model.config.channels:
        raise InputError(f"dataset {name!r} has {x.shape[1]} channels, the model {model.config.channels}")
    if limit is not None and limit < len(x):
        import numpy as np
        x = x[np.linspace(0, len(x) - 1, limit).round().astype(np.int64)] if spread else x[:limit]
    if len(x) == 0:
        raise InputError(f"dataset {name!r} ({args.split}) holds no images")
    return x, name


def _resolve(target: str) -> Path:
    from vdm.checkpoint import resolve_model_path
    return resolve_model_path(target)


# --- vdm eval ---------------------------------------------------------------------------------------------
def _register_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="test-set bits per dimension: the VLB, or the probability-flow ODE bound",
        description="Estimate the negative VLB in bits per dimension on a dataset split: per image the mean "
                    "over K (time, noise) draws, then the mean over images with its standard error. "
                    "Continuous time by default; --steps T gives the T-step discrete-time bound. "
                    "--likelihood ode instead bounds −log p(x) through the probability-flow ODE: "
                    "E_q(z_0|x)[−log p_ODE(z_0) − log p(x|z_0) + log q(z_0|x)], with log p_ODE by the "
                    "instantaneous change of variables (an adaptive ODE solve per batch; Hutchinson trace "
                    "probes or the exact trace), printed beside the VLB of the same images. The ODE bound "
                    "is slow: each ODE function evaluation is a network call plus K vector-Jacobian products, "
                    "and the packaged model needs about 1,800 per batch at the default tolerance 1e-5 (about "
                    "100 at 1e-3); use --limit and --rtol/--atol.")
    _add_common(p)
    _add_data(p)
    p.add_argument("--likelihood", choices=("vlb", "ode"), default="vlb",
                   help="vlb: the variational bound (default); ode: the probability-flow ODE bound")
    p.add_argument("--steps", type=int, default=0, help="T for the discrete-time loss; 0 = continuous (default)")
    p.add_argument("--time-samples", type=int, default=1, metavar="K",
                   help="(time, noise) draws per image for the VLB, stratified in t (default: %(default)s)")
    p.add_argument("--rtol", type=float, default=1e-5, help="ODE relative tolerance (default: %(default)g)")
    p.add_argument("--atol", type=float, default=1e-5, help="ODE absolute tolerance (default: %(default)g)")
    trace = p.add_mutually_exclusive_group()
    trace.add_argument("--hutchinson", type=int, default=1, metavar="K",
                       help="Rademacher probes per image for the Skilling–Hutchinson divergence estimate "
                            "(unbiased; default: %(default)s)")
    trace.add_argument("--exact-trace", action="store_true",
                       help="exact divergence: one vector-Jacobian product per dimension (small images only)")
    p.add_argument("--batch-size", type=int, default=64, help="network batch (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N images of the split (default: all)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    _add_precision(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text line")
    _add_conditioning(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from vdm.evaluate import evaluate, format_result

    if args.steps < 0 or args.time_samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise InputError("--steps must be ≥ 0; --time-samples, --batch-size and --limit ≥ 1")
    if args.likelihood == "ode" and (args.rtol <= 0 or args.atol <= 0 or args.hutchinson < 1):
        raise InputError("--rtol and --atol must be positive and --hutchinson ≥ 1")
    model = _load(args.target, args.device)
    x, name = load_images(args, model, limit=args.limit)
    r = evaluate(model, x, steps=args.steps, time_samples=args.time_samples, batch_size=args.batch_size,
                 seed=args.seed, progress=True, precision=_precision(args), conditioning=args.conditioning)
    if args.likelihood == "ode":
        r.update(_ode_bound(model, x, args))
    if args.json:
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        out.update(data=name, split=args.split, seed=args.seed,
                   checkpoint=str(_resolve(args.target)))
        print(json.dumps(out))
    else:
        if args.likelihood == "ode":
            print(_format_ode(r) + f" ({name}, {args.split})")
        print(format_result(r) + f" ({name}, {args.split})")
    return 0


def _ode_bound(model, x, args) -> dict:
    from vdm.evaluate import ode_image_terms, summarise_ode

    probes = None if args.exact_trace else args.hutchinson
    terms, calls = ode_image_terms(model, x, rtol=args.rtol, atol=args.atol, hutchinson=probes,
                                   batch_size=args.batch_size, seed=args.seed, progress=True,
                                   conditioning=args.conditioning)
    return summarise_ode(terms, calls, hutchinson=probes, rtol=args.rtol, atol=args.atol)


def _format_ode(r: dict) -> str:
    sem = "n/a" if math.isnan(r["ode_bpd_sem"]) else f"{r['ode_bpd_sem']:.3f}"
    trace = "exact trace" if r["exact_trace"] else f"{r['hutchinson']} Hutchinson probe(s)"
    return (f"ODE bound {r['ode_bpd']:.3f} ± {sem} bpd (−log p_ODE(z_0) {r['ode_nll']:.4f}, −log p(x|z_0) "
            f"{r['ode_recon']:.4f}, log q(z_0|x) {r['ode_log_q']:.4f}) on {r['count']} images; "
            f"{r['function_evals']:.0f} ODE function evaluations per batch (each a network call and the "
            f"trace's vector-Jacobian products), {trace}, rtol {r['rtol']:g}, atol {r['atol']:g}")


# --- vdm sample -------------------------------------------------------------------------------------------
def _register_sample(sub) -> None:

    p = sub.add_parser(
        "sample", help="draw images: ancestral, DDIM, DPM-Solver++(2M/3M) or the probability-flow ODE",
        description="Draw N images and write a PNG grid (the first 256) plus FILE.npz beside it holding "
                    "'arr_0', uint8 N×H×W×C (the layout FID tools read). Image i starts from the z_1 drawn "
                    "with the seed (S, i), whatever the sampler and batch size, so samplers can be compared "
                    "image by image. Batches are saved to FILE.partial/ as they finish: rerun the same "
                    "command to resume after an interruption. Samplers: ancestral (stochastic, K steps), "
                    "ddim (η = 0 deterministic, η = 1 ancestral moments), dpmpp-2m and dpmpp-3m (DPM-Solver++ "
                    "multistep, 10–20 network calls), ode (adaptive dopri5 on the probability-flow ODE, "
                    "--rtol/--atol). Each of the K step samplers makes exactly K network calls per image.")
    _add_common(p, optional_help="default: the packaged sampling model (32×32 RGB, trained on photo crops)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=DEFAULT_SAMPLER,
                   help="sampling method (default: %(default)s, 20 network calls per image; ancestral is the "
                        "paper's 1000-step sampler)")
    p.add_argument("--steps", type=int, default=None, metavar="K",
                   help="steps = network calls (default: " + ", ".join(
                       f"{k} {v}" for k, v in DEFAULT_STEPS.items() if v) + "; not for ode)")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="time grid uniform in t or in the log-SNR λ = −γ/2 (default: " + ", ".join(
                       f"{k} {v}" for k, v in DEFAULT_GRID.items() if k != "ode") + ")")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity η in [0, 1] (default: 0)")
    p.add_argument("--rtol", type=float, default=1e-5, help="ode: relative tolerance (default: %(default)g)")
    p.add_argument("--atol", type=float, default=1e-5, help="ode: absolute tolerance (default: %(default)g)")
    p.add_argument("-n", "--num", type=int, default=16, help="number of images (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--out", default="samples.png", help="output PNG grid (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="overwrite the PNG and the .npz beside it if they exist (default: refuse, before sampling)")
    p.add_argument("--image-size", type=int, default=None, help="H = W (default: the model's)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: ⌈√N⌉)")
    _add_precision(p)
    _add_conditioning(p)
    p.set_defaults(func=cmd_sample)


def sample_settings(args) -> dict:
    """The keyword arguments of `vdm.sample_run.sample_images` for the command's options, checked."""
    if args.num < 1 or args.batch < 1 or (args.image_size is not None and args.image_size < 1):
        raise InputError("-n, --batch and --image-size must be positive")
    settings = dict(sampler=args.sampler, seed=args.seed, image_size=args.image_size,
                    precision=_precision(args), conditioning=args.conditioning)
    if args.sampler == "ode":
        if args.steps is not None or args.grid is not None:
            raise InputError("--steps and --grid do not apply to --sampler ode (adaptive; set --rtol/--atol)")
        if args.rtol <= 0 or args.atol <= 0:
            raise InputError(f"--rtol and --atol must be positive, got {args.rtol:g} and {args.atol:g}")
        return {**settings, "rtol": args.rtol, "atol": args.atol}
    steps = DEFAULT_STEPS[args.sampler] if args.steps is None else args.steps
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    settings.update(steps=steps, grid=args.grid or DEFAULT_GRID[args.sampler])
    if args.sampler == "ddim":
        if not 0.0 <= args.eta <= 1.0:
            raise InputError(f"--eta must lie in [0, 1], got {args.eta:g}")
        settings["eta"] = args.eta
    elif args.eta != 0.0:
        raise InputError("--eta applies to --sampler ddim only")
    return settings


def cmd_sample(args) -> int:
    from vdm.sample_run import ResumeError, sample_to_files

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out must name a .png file, got {out}")
    for path in (out, out.with_suffix(".npz")):
        check_output_file(path, args.force, "--out")
    settings = sample_settings(args)
    model = _load(args.target or _packaged_sampling_model(), args.device)
    try:
        images = sample_to_files(model, out, args.num, batch=args.batch, settings=settings, nrow=args.nrow)
    except ResumeError as e:
        raise InputError(str(e)) from None
    if images.shape[1] not in (1, 3):
        print(f"note: {images.shape[1]} channels, no PNG grid written", file=sys.stderr)
    how = f"{settings['steps']} steps" if "steps" in settings else f"rtol {args.rtol:g}, atol {args.atol:g}"
    print(f"wrote {args.num} samples ({args.sampler}, {how}, seed {args.seed}) to {out} and "
          f"{out.with_suffix('.npz')}")
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
    p.add_argument("--force", action="store_true",
                   help="overwrite figures that already exist in the output folder (default: refuse, before plotting)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from vdm.plot import MetricsError, plot_run, pyplot

    try:
        pyplot()
    except ImportError as e:
        raise InputError(str(e)) from None
    if args.images < 0 or args.points < 1:
        raise InputError("--images must be ≥ 0 and --points ≥ 1")
    run = run_dir_of(args.target)
    target = Path(args.target)
    out = Path(args.out) if args.out else (run or (target if target.is_dir() else target.parent)) / "plots"
    metrics = run / "metrics.jsonl" if run is not None and (run / "metrics.jsonl").is_file() else None
    check_output_dir(out, "--out")
    for name in _figures(metrics is not None, args.images > 0):
        check_output_file(out / name, args.force, "--out")
    model = _load(args.target, args.device)
    if metrics is None:
        print("note: no metrics.jsonl found, no training curve", file=sys.stderr)
    data = load_images(args, model, limit=args.images, spread=True)[0] if args.images else None
    try:
        written = plot_run(model, out, metrics=metrics, data=data, points=args.points, seed=args.seed)
    except MetricsError as e:
        raise InputError(str(e)) from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _figures(curve: bool, integrand: bool) -> list[str]:
    """The file names `vdm.plot.plot_run` writes: the training curve with metrics, the integrand with images."""
    return ["training_curve.png"] * curve + ["schedule.png"] + ["diffusion_integrand.png"] * integrand
