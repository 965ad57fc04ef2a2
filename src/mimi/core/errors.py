"""Typed exceptions. Library code raises these; the CLI turns them into one clear line."""

from __future__ import annotations


class MimiError(Exception):
    """Base class of every error the library raises on purpose (bad input, missing files)."""


class ConfigError(MimiError, ValueError):
    """A configuration value is invalid."""


class ModelError(MimiError, ValueError):
    """The model does not have the structure an operation needs."""


class CheckpointError(MimiError):
    """A checkpoint file is missing, malformed, or does not fit the model."""


class DataError(MimiError):
    """A dataset is missing, malformed, or its files are not where they should be."""


class BackboneError(MimiError):
    """A backbone or its weights cannot be created or loaded."""


class TrainingError(MimiError):
    """Training cannot go on (loss became NaN/inf, disk full); the last good checkpoint is kept. Exit code 3."""
