"""The small exception hierarchy every stage raises from.

Retries are only ever attached to :class:`TransientStorageError`; everything else is either a
bad input (recorded with a reason, never raised through a flow) or a configuration / model
problem that must stop the run loudly.
"""

from __future__ import annotations


class FaceloopError(Exception):
    """Base class of faceloop's own errors."""


class ConfigError(FaceloopError):
    """The configuration is invalid or names something that does not exist."""


class ModelLoadError(FaceloopError):
    """A face model could not be found, verified or loaded."""


class BadInputError(FaceloopError):
    """An input image cannot be used. ``reason`` is a short machine-readable code.

    Bad inputs never stop a run: the stage that catches this records ``reason`` in the
    images or faces table (status ``quarantined`` or ``rejected``) and carries on.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StorageError(FaceloopError):
    """A store operation failed for a reason that retrying will not fix."""


class TransientStorageError(StorageError):
    """A store operation failed for a reason that may go away (timeouts, 5xx, throttling)."""
