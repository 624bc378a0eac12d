"""Which chunk objects of an array exist, so that no read takes Zarr's fill value for data.

Zarr returns the fill value for a chunk whose object is missing. kdcache writes every chunk of a
per-view array (``write_empty_chunks``), so a missing object is always damage. One listing per array
(per process) gives a boolean grid of the chunk objects present; every read checks the chunks it
touches against it before decoding. On local disk a listing is one directory walk; on S3 it is one
request per 1,000 objects, so the check adds about 0.1 % to the requests of an epoch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import zarr
import zarr.storage

from kdcache.cache.storage import run
from kdcache.errors import CacheCorrupt

#: What every message about damaged data ends with: how to find all of it and repair it.
REPAIR = "run `kdcache verify {path}` to list the damage, then `kdcache verify {path} --repair` and rerun the " \
         "precompute command to rewrite those shards"


class ChunkIndex:
    """The grid of chunk (or shard) objects of one array that storage holds."""

    def __init__(self, arr: zarr.Array, name: str) -> None:
        self.name = name
        self.outer = tuple(arr.shards or arr.chunks)
        self.shape = tuple(-(-n // s) for n, s in zip(arr.shape, self.outer))
        self.present = np.zeros(self.shape, dtype=bool)
        prefix = f"{arr.store_path.path}/c/"
        for key in store_keys(arr.store_path.store, prefix):
            parts = key[len(prefix):].split("/")
            if len(parts) == len(self.shape) and all(p.isdigit() for p in parts):
                coords = tuple(int(p) for p in parts)
                if all(c < n for c, n in zip(coords, self.shape)):
                    self.present[coords] = True

    def key(self, coords: Sequence[int]) -> str:
        return f"{self.name}/c/" + "/".join(map(str, coords))

    def block_missing(self, start: int, stop: int, view: int) -> str | None:
        """:meth:`first_missing` for samples ``start..stop-1`` at one view: the training reader's call,
        made for every block of every array, so it does no more than one slice of the grid."""
        rows = self.present[start // self.outer[0]: -(-stop // self.outer[0])]
        if (rows[:, view // self.outer[1]] if len(self.shape) > 1 else rows).all():
            return None
        return self.first_missing(slice(start, stop), view)

    def first_missing(self, samples: np.ndarray | slice, views: np.ndarray | int | None = None) -> str | None:
        """Key of the first absent chunk holding any of ``samples`` (indices, or a slice) at ``views``
        (all views when None), or None when all are present."""
        if isinstance(samples, slice):
            rows = np.arange(samples.start // self.outer[0], -(-samples.stop // self.outer[0]))
        else:
            rows = np.unique(np.asarray(samples, dtype=np.int64) // self.outer[0])
        grid = self.present[rows]
        cols = None
        if len(self.shape) > 1:
            cols = (np.arange(self.shape[1]) if views is None
                    else np.unique(np.atleast_1d(np.asarray(views, dtype=np.int64)) // self.outer[1]))
            grid = grid[:, cols]
        if grid.all():
            return None
        where = [int(w) for w in np.argwhere(~grid)[0]]
        coords = [int(rows[where[0]])] + ([int(cols[where[1]]), *where[2:]] if cols is not None else [])
        return self.key(coords)


def store_keys(store: zarr.abc.store.Store, prefix: str) -> list[str]:
    """Every key under ``prefix``: a directory walk for a local store (several times faster than Zarr's
    async listing), the store's own listing otherwise (one request per 1,000 keys on S3)."""
    if isinstance(store, zarr.storage.LocalStore):
        base = os.path.join(str(store.root), prefix)
        keys = []
        for folder, _, files in os.walk(base):
            rel = os.path.relpath(folder, str(store.root)).replace(os.sep, "/")
            keys += [f"{rel}/{name}" for name in files]
        return keys

    async def listing() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return run(listing())


def missing_error(path: str, name: str, key: str) -> CacheCorrupt:
    return CacheCorrupt(f"cache {path}: chunk {key} of array {name} is missing, so its data would read as zeros — "
                        + REPAIR.format(path=path))


def damaged_error(path: str, name: str, where: str, exc: BaseException) -> CacheCorrupt:
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return CacheCorrupt(f"cache {path}: array {name} {where} does not decode ({reason}) — " + REPAIR.format(path=path))
