"""kdcache: run a costly teacher once, cache its outputs in Zarr v3, train many students from the cache."""

from __future__ import annotations

__version__ = "0.1.0"

from kdcache.errors import KdcacheError  # noqa: E402
from kdcache.store import open_cache  # noqa: E402

__all__ = ["KdcacheError", "__version__", "open_cache"]
