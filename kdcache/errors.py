"""The one place kdcache's exceptions live.

Library code raises these; the CLI turns each into a single ``Error: ...`` line and exit code 2.
Every message says what is wrong and how to fix it.
"""

from __future__ import annotations


class KdcacheError(Exception):
    """Base class of every error kdcache raises for bad input or a bad cache."""


class InvalidSpec(KdcacheError):
    """A dataset, model, loss, augmentation or option value that kdcache cannot interpret."""


class MissingDependency(KdcacheError):
    """An optional package is needed for the requested feature and is not installed."""


class MissingData(KdcacheError):
    """A file or folder the user named does not exist or holds nothing usable."""


class WeightsMismatch(KdcacheError):
    """A weights file does not fit the model it is loaded into."""


class CacheMismatch(KdcacheError):
    """A cache was made from different inputs than the ones it is used with."""


class CacheCorrupt(KdcacheError):
    """A cache is incomplete, unreadable, or fails its integrity checks."""


class InterruptedLayout(CacheCorrupt):
    """A cache layout whose creation stopped before its manifest was written: rerunning rebuilds it."""


class CacheLocked(KdcacheError):
    """Another writer holds the cache."""


class UnsupportedFormat(KdcacheError):
    """A cache written by a newer kdcache format than this version understands."""


class TrainingDiverged(KdcacheError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class DataCorrupt(KdcacheError):
    """A dataset file is damaged: an unreadable archive, an image that does not decode, a sample
    without its label. The message names the file (shard) and the sample's key."""


class UnsafeFile(KdcacheError):
    """A file another system wrote asks to run code when read (a pickle naming a function or class that
    is not plain data). Nothing of it was run."""
