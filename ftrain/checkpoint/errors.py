"""Exceptions raised by :mod:`ftrain.checkpoint`; each message says what, where, and how to fix it."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointMismatchError", "CorruptCheckpointError", "StepAlreadyExistsError"]


class CheckpointError(Exception):
    """Base class of every checkpoint error."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint's file is missing, truncated or altered (its size or hash differs from the manifest).

    Attributes:
        path: the checkpoint directory.
        file: the offending file, relative to ``path`` (``None`` when the directory itself is unusable).
    """

    def __init__(self, message: str, *, path: object = None, file: str | None = None):
        super().__init__(message)
        self.path = path
        self.file = file


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the template (``like``): a key path, dtype or shape differs."""


class StepAlreadyExistsError(CheckpointError, ValueError):
    """A checkpoint for this step is already committed."""
