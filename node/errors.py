"""The exceptions of ainode: one base class, one subclass per kind of failure."""

from __future__ import annotations


class AinodeError(Exception):
    """Base class of every error ainode raises on purpose."""


class ConfigError(AinodeError):
    """The configuration file is missing, unreadable or invalid.

    The message names the file, the key and the reason in one line.
    """


class AdminError(AinodeError):
    """An admin command got input it cannot act on (bad value, unknown name)."""


class StoreError(AinodeError):
    """An instance could not be stored."""


class InvalidUIDError(StoreError):
    """A UID is not safe to use as a file name (not digits and dots, or too long)."""


class RedisUnavailableError(AinodeError):
    """The Redis server could not be started or reached."""


class NoUsableSeriesError(AinodeError):
    """A study has no series the model can analyse (not CT, localizer only...).

    The message is the reason recorded for the study.
    """


class VolumeError(AinodeError):
    """A series cannot be turned into a volume (inconsistent slices, bad pixel data)."""


class ModelError(AinodeError):
    """The model or its card is missing, does not match, or cannot run as configured."""


class StudyLimitError(AinodeError):
    """A study the node will not analyse: over a configured cost limit, or with non-physical values.

    Recorded as "no result" with the reason; never retried.
    """
