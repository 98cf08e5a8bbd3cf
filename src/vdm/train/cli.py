"""`vdm train`: build a TrainConfig from a preset, TOML files and overrides, then call `vdm.train.train`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vdm.errors import InputError, check_output_dir
from vdm.presets import preset_names

EPILOG = """\
examples:
  vdm train --preset quick --out runs/quick --max-minutes 5
  vdm train --preset compress --out runs/compress --set run.precision=fp32 --set optim.lr=5e-4
  vdm train --out runs/compress --resume                # continue with the run's own config.json
  vdm train --preset compress --out runs/c2 --set data.name=photos+wallpapers --set 'data.crop_sizes=[16,32,48]' \\
      --set run.init_from=runs/compress                  # fine-tune a model on random crops of more photos
  torchrun --nproc_per_node=4 -m vdm train --preset cifar10 --set data.root=~/data/cifar10 --out runs/c10

overrides (--set SECTION.KEY=VALUE, repeatable) are type-checked against the config's fields:
  model.*  (VDMConfig: n_embd, n_layer, dropout, gamma_type, timesteps, variance_minimisation, ...)
  optim.*  (lr, beta1, beta2, eps, weight_decay, warmup_steps, decay_steps, grad_clip)
  data.*   (name, root, test_split, test_images, augment, crop_sizes: e.g. [16,32,48] trains on random
            crops with left-right flips of the whole photographs of photos / wallpapers / photos+wallpapers)
  run.*    (seed, batch_size, max_steps, ema_decay, ema_warmup, log_every, eval_every, checkpoint_every,
            keep_last, max_nonfinite, device, precision (auto, bf16, fp32), conv_algorithm (auto,
            winograd, direct), compile, split (CPU: each step's batch as this many parts side by side, one
            torch thread each), progress, tensorboard, init_from: a model file to start from)
Use --print-config to see every key with its resolved value.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a VDM (presets, checkpoints, exact resume, torchrun)",
        description="Train a Variational Diffusion Model, writing RUN_DIR/checkpoints/step_*/ (model, EMA and "
                    "training state), RUN_DIR/config.json and RUN_DIR/metrics.jsonl.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=preset_names(), default=None,
                   help="named preset to start from (default: 'quick' unless --config is given, then the built-in "
                        "defaults; a resumed run without --preset/--config uses its own config.json)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.toml",
                   help="TOML file with [model]/[optim]/[data]/[run] tables, applied after the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one setting, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--out", required=False, metavar="RUN_DIR", help="run directory (required unless "
                   "--print-config)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in RUN_DIR (starts fresh if there is none); without "
                        "it a RUN_DIR that holds checkpoints is refused")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total "
                   "(overrides run.max_steps)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this many minutes of this session, writing a checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=run_train)


def resolve_config(args):
    """The TrainConfig meant by the arguments: a resumed run without --preset/--config starts from its own
    config.json; otherwise the preset (default 'quick') and files. Overrides come last."""
    from vdm.config import apply_overrides, build_config, load_json_config
    saved = Path(args.out) / "config.json" if args.out else None
    if args.resume and args.preset is None and not args.config and saved is not None and saved.is_file():
        return apply_overrides(load_json_config(saved), args.overrides)
    preset = args.preset or (None if args.config else "quick")
    return build_config(preset, args.config, args.overrides)


def run_train(args) -> int:
    from vdm.train import train

    config = resolve_config(args)
    if args.print_config:
        print(config.to_json())
        return 0
    if args.max_steps is not None and args.max_steps < 0:
        raise InputError(f"--max-steps must not be negative, got {args.max_steps}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise InputError(f"--max-minutes must be positive, got {args.max_minutes}")
    if not args.out:
        raise InputError("--out RUN_DIR is required")
    check_output_dir(args.out, "--out")
    summary = train(config, args.out, resume=args.resume, max_steps=args.max_steps, max_minutes=args.max_minutes)
    if os.environ.get("RANK", "0") == "0":  # one summary line, from rank 0 under torchrun
        print(json.dumps(summary))
    return 0
