"""Errors a user can cause.

Every exception here carries a message that says what is wrong and how to fix it. The API maps
them to HTTP 4xx, the worker to a failed job, the CLI to exit code 2 - always with the same text.
"""


class MsamError(Exception):
    """Base class of every user-facing msam error."""

    code = "msam_error"


class InvalidVolume(MsamError):
    """The image cannot be used: unreadable, not 3D, bad geometry, ..."""

    code = "invalid_volume"


class InvalidPrompt(MsamError):
    """A prompt is malformed or does not fit the image (outside it, no positive point, ...)."""

    code = "invalid_prompt"


class InvalidCheckpoint(MsamError):
    """A weights file is unreadable, unsafe to load, or does not match the model."""

    code = "invalid_checkpoint"


class InvalidDataset(MsamError):
    """A data folder cannot be used for training or evaluation: missing, neither an MSD folder
    (dataset.json) nor a plain one (images/ + labels/), or without cases in the split asked for."""

    code = "invalid_dataset"


class UnsupportedRequest(MsamError):
    """The combination asked for is not possible (e.g. DICOM-SEG for a NIfTI input)."""

    code = "unsupported_request"
