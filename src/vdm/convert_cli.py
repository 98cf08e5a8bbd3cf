"""`vdm convert`: an official checkpoint (google-research/vdm, `<prefix>.flax`) → a `vdm` model file."""

from __future__ import annotations

import argparse

from vdm.errors import InputError, check_output_file

PARAM_TREES = {"ema": "ema_params", "raw": "params"}


def register(subparsers) -> None:
    from vdm.official_configs import OFFICIAL_CONFIGS

    p = subparsers.add_parser(
        "convert", help="convert an official pretrained checkpoint (google-research/vdm) into a vdm model file",
        description="Read an official VDM checkpoint (the `<prefix>.flax` file that the official code writes "
                    "beside TensorFlow's files) without JAX, Flax or TensorFlow, and write a vdm model file "
                    "that `vdm eval`, `vdm sample`, `vdm compress` and `vdm.load_model` use like any other. "
                    "Only the chosen parameter tree is read; the Adam moments are skipped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  vdm convert checkpoint-final/checkpoints-0 --config cifar10 --out cifar10.safetensors")
    p.add_argument("official", metavar="OFFICIAL",
                   help="the .flax file, its prefix as copied from the official bucket (…/checkpoints-0), or a "
                        "directory (its highest-numbered *.flax)")
    p.add_argument("--config", required=True, metavar="NAME_OR_JSON",
                   help=f"the official configuration: one of {', '.join(OFFICIAL_CONFIGS)}, or a JSON file with "
                        f"the official config.model fields (at the top level or under \"config\")")
    p.add_argument("--out", required=True, metavar="MODEL.safetensors", help="the model file to write")
    p.add_argument("--params", choices=sorted(PARAM_TREES), default="ema",
                   help="which weights: the EMA weights the official evaluation uses (ema, default) or the raw "
                        "training weights (raw)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="the model's image side (default: the configuration's, 32 for CIFAR-10)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out if it exists (default: refuse, before reading the checkpoint)")
    p.set_defaults(func=convert_command)


def convert_command(args) -> int:
    from vdm.checkpoint import save_model
    from vdm.convert import convert_checkpoint

    out = check_output_file(args.out, args.force, "--out")
    if args.image_size is not None and args.image_size < 1:
        raise InputError(f"--image-size must be positive, got {args.image_size}")
    model, source = convert_checkpoint(args.official, args.config, tree=PARAM_TREES[args.params],
                                       image_size=args.image_size)
    save_model(model, out, source=source)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {source['file']} (step {source['step']}, {args.params} weights) → {out}: "
          f"{cfg.gamma_type} schedule, width {cfg.n_embd}, depth {cfg.n_layer}, "
          f"attention {'on' if cfg.attention else 'off'}, {cfg.image_size}×{cfg.image_size}×{cfg.channels}, "
          f"{n / 1e6:.2f} M parameters")
    return 0
