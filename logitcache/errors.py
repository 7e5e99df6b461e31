"""Errors that users see. Each message names the file, shard and key involved.

The CLI catches :class:`LogitcacheError` and prints its message on one line, with no
traceback, and exits non-zero.
"""

from __future__ import annotations


class LogitcacheError(Exception):
    """Base class for every error meant for the user (clear message, no traceback)."""


class BadSampleError(LogitcacheError):
    """A sample could not be read or decoded (corrupt image, label out of range, ...)."""

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"shard {shard}" if shard else "", f"key {key}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.shard = shard
        self.key = key


class BadShardError(LogitcacheError):
    """A shard file is unreadable as a whole (truncated or corrupt tar, missing file)."""


class CacheMismatchError(LogitcacheError):
    """A cache does not match what it is used with (other dataset, recipe, teacher, classes)."""


class CacheNotFoundError(LogitcacheError):
    """No cache (or more than one) matches what was asked for."""


class CorruptCacheError(LogitcacheError):
    """A cache's arrays are incomplete or fail their checksums."""


class WeightsUnavailableError(LogitcacheError):
    """Teacher weights could not be loaded (offline, no file, wrong file)."""


class BadLogitsError(LogitcacheError):
    """The teacher produced NaN/inf logits or logits of the wrong class count."""


class SynthSizeError(LogitcacheError, ValueError):
    """Sizes the synthetic dataset cannot be made with (classes, images per class, pixels)."""


class UnknownRecipeError(LogitcacheError, ValueError):
    """A recipe name that is not in :data:`RECIPES` (still a ValueError for older callers)."""


class ConfigError(LogitcacheError):
    """A run's settings are wrong: an unreadable config file, an unknown key or name, a bad value."""
