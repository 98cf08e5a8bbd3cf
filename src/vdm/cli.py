"""The `vdm` command line: a thin layer; each subcommand calls one importable function.

Exit codes, the same for every subcommand: 0 done; 1 the work started and failed (e.g. training stopped on
non-finite losses, or the disk filled up; one line on stderr says why); 2 the input was refused (bad arguments,
configuration, file, model or dataset, or an output that exists without --force; one line on stderr names the
bad input, and nothing was written); 130 interrupted. An unexpected exception is a bug: exit 1 with its
traceback.

`main` is the one place that catches errors: commands raise `vdm.errors.InputError` (or let the library's own
refusals propagate) and check their inputs and outputs before any work; `vdm.errors.exit_code` sorts them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, adding its subcommand(s) with `set_defaults(func=...)`.
COMMAND_MODULES = [
    "vdm.commands",  # eval, sample, plot
    "vdm.train.cli",  # train
    "vdm.codec.cli",  # compress, decompress
    "vdm.convert_cli",  # convert
]


def build_parser() -> argparse.ArgumentParser:
    from vdm import __version__

    parser = argparse.ArgumentParser(
        prog="vdm", description="Variational Diffusion Models: train, evaluate, sample, compress.",
        epilog="exit codes: 0 done, 1 failed while running, 2 input refused (one line on stderr), 130 interrupted")
    parser.add_argument("--version", action="version", version=f"vdm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from vdm.errors import exit_code, message
        code = exit_code(e)
        if code is None:
            raise  # a bug: keep the traceback
        print(f"vdm {args.command}: error: {message(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
