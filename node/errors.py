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
