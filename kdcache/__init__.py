"""kdcache: run a costly teacher once, cache its outputs in Zarr v3, train many students from the cache.

The flat API — ``from kdcache import precompute, train, open_cache, PrecomputeConfig, TrainConfig,
loader`` — names the stage functions; each is imported on first use, so that importing one stage
(``kdcache.student``) never loads the other.
"""

from __future__ import annotations

import importlib
from typing import Any

from kdcache.errors import KdcacheError

__version__ = "0.1.0"

#: Flat name -> the module that defines it.
_FLAT = {
    "PrecomputeConfig": "kdcache.teacher.config",
    "precompute": "kdcache.teacher.precompute",
    "TrainConfig": "kdcache.student.config",
    "train": "kdcache.student.train",
    "loader": "kdcache.student.reader",
    "open_cache": "kdcache.cache.store",
}

__all__ = ["KdcacheError", "__version__", *_FLAT]


def __getattr__(name: str) -> Any:
    if name not in _FLAT:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_FLAT[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
