"""Typed user errors.

Every user error is one sentence that says what is wrong and what to do. The CLI prints it without a
traceback and exits with code 2. Anything that is not an `Oiv2Error` is a bug and keeps its traceback.
"""

from __future__ import annotations


class Oiv2Error(Exception):
    """Base class of the errors a user can cause and fix."""


class ConfigError(Oiv2Error, ValueError):
    """A build option has a value that is not allowed."""


class ModelNotFoundError(Oiv2Error):
    """The model path does not exist, or is not a Hugging Face model directory, or no preset has that name."""


class UnsupportedModelError(Oiv2Error):
    """The model's architecture cannot be captured or transformed by this version."""


class BuildError(Oiv2Error):
    """The build could not produce a correct artifact (output exists, verification failed)."""


class ArtifactError(Oiv2Error):
    """The artifact is missing, changed after the build, or was built for another torch, device or format."""


class InvalidRequestError(Oiv2Error):
    """A generation request the artifact cannot serve (empty or too long prompt, cache overflow, bad ids)."""
