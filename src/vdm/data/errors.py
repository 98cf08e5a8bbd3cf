"""The one exception type of :mod:`vdm.data`."""

from __future__ import annotations

import os

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A dataset file or folder is missing, truncated or malformed.

    The message always names the file (or folder) and says what is wrong.
    ``path`` holds that file as a string (or ``None`` when no file is involved).
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")
