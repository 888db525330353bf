"""Exceptions of the training package."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class: a training run cannot go on; the message says why."""


class ConfigError(TrainingError):
    """The run's config is unusable (names the file and key)."""


class DataError(TrainingError):
    """A data source is unusable (names the file, row or case)."""


class ExportError(TrainingError):
    """The ONNX export failed or does not match TensorFlow."""
