"""How the command line fails: the one error type of refused input, the library errors that mean the same, and
the checks of input and output paths that every command makes before any work.

`vdm.cli.main` is the one place that catches errors (see `exit_code`): refused input exits with 2 and one line
on stderr; a run that started and failed (non-finite losses, a disk that fills up) exits with 1 and one line;
any other exception is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

__all__ = ["InputError", "check_input_file", "check_output_dir", "check_output_file", "exit_code", "message"]


class InputError(ValueError):
    """Input refused before any work: a bad argument, path, configuration, model, dataset or file.

    The message names the bad input; nothing has been written."""


# The library's exceptions that mean refused input, as (module, class). An exception of one of these classes can
# only exist once its module has been imported, so they are looked up in sys.modules and none is imported here.
REFUSED = (
    ("vdm.checkpoint", "CheckpointError"),  # a missing or unreadable model, checkpoint or training state
    ("vdm.config", "ConfigError"),
    ("vdm.data.errors", "DatasetError"),
    ("vdm.codec.container", "CodecFormatError"),  # a damaged .vdmc file
    ("vdm.codec.bitsback", "CorruptStreamError"),
    ("vdm.codec.compressor", "ModelMismatchError"),  # a .vdmc file made with another model
    ("vdm.codec.images", "ImageReadError"),
    ("vdm.plot", "MetricsError"),
    ("vdm.flax_checkpoint", "FlaxCheckpointError"),
    ("vdm.official_configs", "OfficialConfigError"),
    ("vdm.convert", "ConversionError"),
    ("vdm.train.loop", "TrainingError"),  # every TrainingError but a FAILED one refuses the run before it writes
)
# The library's exceptions that mean a run started and failed.
FAILED = (
    ("vdm.train.loop", "NonFiniteLossError"),
)


def _loaded(names) -> tuple[type[BaseException], ...]:
    return tuple(c for module, name in names if (c := getattr(sys.modules.get(module), name, None)) is not None)


def exit_code(e: BaseException) -> int | None:
    """2 for an exception that means refused input, 1 for a run that started and failed (a FAILED library error,
    or an OSError: paths are checked before the work, so one raised later is the machine's), None for anything
    else: a bug, which should propagate with its traceback."""
    if isinstance(e, _loaded(FAILED)):
        return 1
    if isinstance(e, (InputError, *_loaded(REFUSED))):
        return 2
    if isinstance(e, OSError):
        return 1
    return None


def message(e: BaseException) -> str:
    """The one-line message of `e`: an OSError as "path: reason" in words (never "[Errno N] ..."), anything
    else as its text with line breaks folded."""
    if isinstance(e, OSError) and e.errno is not None:
        reason = (e.strerror or os.strerror(e.errno)).lower()
        text = reason if e.filename is None else f"{e.filename}: {reason}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


# --- paths, checked before any work ---------------------------------------------------------------------------
def check_input_file(path: str | os.PathLike) -> Path:
    """`path` if it is a readable file; InputError saying what it is instead."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not a file")
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: not readable (permission denied)")
    return p


def check_output_file(path: str | os.PathLike, force: bool, option: str) -> Path:
    """`path` if the command may write the file there: not a directory (even with --force: a directory is never
    replaced by a file), not an existing file unless `force`, in a folder that exists or can be made and is
    writable. `option` names the argument, e.g. "--out"."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a directory; {option} names a file to write")
    if (p.exists() or p.is_symlink()) and not force:
        raise InputError(f"{p} exists (use --force to overwrite)")
    _check_creatable(p.parent, p)
    return p


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """`path` if the command may write files into it: a writable directory, or one that can be made."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p}: exists and is not a directory; {option} names a directory")
    _check_creatable(p, p)
    return p


def _check_creatable(folder: Path, target: Path) -> None:
    """InputError unless `folder` is a writable directory or can be made: its nearest existing ancestor is a
    writable directory."""
    d = folder
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise InputError(f"{d}: is not a directory, so {target} cannot be written")
    if not os.access(d, os.W_OK | os.X_OK):
        raise InputError(f"{d}: {os.strerror(errno.EACCES).lower()}, so {target} cannot be written")
