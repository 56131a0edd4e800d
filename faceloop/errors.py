"""The small exception hierarchy every stage raises from, and the CLI's exit codes.

Retries are only ever attached to :class:`TransientStorageError`; everything else is either a
bad input (recorded with a reason, never raised through a flow) or a configuration / model
problem that must stop the run loudly.

Exit codes (``faceloop`` CLI, documented in the README): 0 ok, 1 the run failed
(:class:`FaceloopError` and anything unexpected), 2 bad usage or configuration
(:class:`ConfigError`, argparse), 3 another writer holds the store (:class:`StoreLockedError`).
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3


class FaceloopError(Exception):
    """Base class of faceloop's own errors."""

    exit_code = EXIT_FAILED


class ConfigError(FaceloopError):
    """The configuration is invalid or names something that does not exist."""

    exit_code = EXIT_USAGE


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


class StoreLockedError(FaceloopError):
    """Another writer (refresh, review apply, forget, gc) holds the store's lock."""

    exit_code = EXIT_LOCKED
