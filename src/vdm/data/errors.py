"""The one exception type of :mod:`vdm.data`, and the check of a split name."""

from __future__ import annotations

import os

__all__ = ["DatasetError", "check_split"]

SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset file or folder is missing, truncated or malformed.

    The message always names the file (or folder) and says what is wrong.
    ``path`` holds that file as a string (or ``None`` when no file is involved).
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


def check_split(split: str, allowed=SPLITS, what: str = "this dataset") -> str:
    """`split` if it is one of `allowed`, else a ValueError naming the choices."""
    if split not in allowed:
        raise ValueError(f"unknown split {split!r} for {what}: use one of {', '.join(map(repr, allowed))}")
    return split
