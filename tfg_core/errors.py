"""Exceptions that name the offending file and the problem, so a batch log says what to fix."""

from __future__ import annotations

import os


class TfgError(Exception):
    """Base class for every error this package raises on purpose."""


class DataError(TfgError, ValueError):
    """An input file (scan, annotation table, DICOM folder, manifest) is unreadable or inconsistent.

    Args:
        path: the file or folder at fault.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CheckpointError(TfgError, ValueError):
    """A checkpoint is missing, has the wrong checksum, or does not fit the architecture."""
