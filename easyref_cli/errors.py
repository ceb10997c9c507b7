"""One error hierarchy for the whole tool.

Library code raises these; ``cli.py`` maps them to exit codes in one place.
Every message should say what went wrong *and* what to do about it.
"""

from __future__ import annotations


class EasyRefError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with when this escapes."""

    exit_code = 2


class UsageError(EasyRefError):
    """Bad options, bad config/preset/prompt file, missing paths: detected before any work."""


class InputError(EasyRefError):
    """A reference image or group cannot be used (unreadable, truncated, empty group...)."""


class ModelError(EasyRefError):
    """Model weights or folders are missing, incomplete or inconsistent."""


class CheckpointError(ModelError):
    """An EasyRef checkpoint is missing keys, has mis-shaped tensors, or cannot be read."""


class JobError(EasyRefError):
    """One generation job failed (NaNs, out of memory...); the batch runner records it and goes on."""

    exit_code = 1


class StorageError(EasyRefError):
    """The output storage cannot take more (disk full, quota, read-only): the run stops at once, with
    what it finished intact, instead of computing images it cannot write."""

    exit_code = 1
