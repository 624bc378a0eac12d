"""What lies in a cache's storage, beside the values: the per-shard status flags, the chunk objects
present, and the stored shapes and sizes. Readers, ``verify`` and ``info`` ask these questions;
kdcache/cache/integrity.py builds the full verification on them.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np

from kdcache.cache.chunks import REPAIR, damaged_error, store_keys
from kdcache.cache.reading import CacheReader
from kdcache.cache.storage import STATUS_ARRAY, run
from kdcache.errors import CacheCorrupt


class Cache(CacheReader):
    """An open cache that can only be read: its manifest, typed reads, and the integrity questions about its
    storage. ``open_cache(path)`` gives one; writers get a :class:`kdcache.cache.writing.CacheWriter`."""

    def check_readable(self, names: Iterable[str] | None = None) -> None:
        """Refuse, in one line, a cache whose bookkeeping says it is not whole: a shard flag that is not
        set in a complete cache, an array without metadata, or a missing chunk object of ``names``
        (default: every per-view array). Readers call it before they start."""
        done = self.shards_done()
        if not done.all():
            first = int(np.flatnonzero(~done)[0])
            raise CacheCorrupt(f"cache {self.path} says it is complete but {STATUS_ARRAY} marks shard {first} "
                               f"({int((~done).sum())} of {len(done)}) unwritten — " + REPAIR.format(path=self.path))
        expected = self.expected_arrays()
        for name in ["labels", *(self.array_names if names is None else names)]:
            arr = self._array(name)
            if name in expected and (tuple(arr.shape), str(arr.dtype)) != expected[name][:2]:
                raise CacheCorrupt(f"cache {self.path}: array {name} is stored as {list(arr.shape)} {arr.dtype}, the "
                                   f"manifest says {list(expected[name][0])} {expected[name][1]} — the manifest was "
                                   "edited or the cache is damaged; rebuild it with precompute --rebuild")
            self._present(name, slice(0, self.num_samples))

    def shards_done(self, strict: bool = True) -> np.ndarray:
        """Boolean [num_shards]: which shards are fully written (a flag never written reads as not done).
        A flag whose chunk does not decode is CacheCorrupt naming it, or with ``strict=False`` not done."""
        status = self._array(STATUS_ARRAY)
        try:
            return np.asarray(status[:]).astype(bool)
        except Exception:  # noqa: BLE001 - find the damaged flags one by one
            done = np.zeros(status.shape[0], dtype=bool)
            for shard in range(status.shape[0]):
                try:
                    done[shard] = bool(status[shard])
                except Exception as exc:  # noqa: BLE001
                    if strict:
                        raise damaged_error(self.path, STATUS_ARRAY, f"chunk {STATUS_ARRAY}/c/{shard}", exc) from None
            return done

    def read_flag(self, shard: int) -> bool:
        """Flag ``shard`` of the shard status alone; CacheCorrupt when its chunk does not decode."""
        return bool(self._decoded(STATUS_ARRAY, f"chunk {STATUS_ARRAY}/c/{shard}",
                                  lambda: self._array(STATUS_ARRAY)[shard]))

    def stored_layout(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and Zarr dtype of array ``name`` as stored; CacheCorrupt when it is missing."""
        try:
            arr = self.group[name]
        except KeyError as exc:
            raise CacheCorrupt(f"cache {self.path} lacks array {name} — it is damaged; re-run precompute") from exc
        return tuple(arr.shape), str(arr.dtype)

    def array_bytes(self, name: str) -> tuple[int, int]:
        """(stored bytes of its chunks, uncompressed bytes) of array ``name``; metadata not counted."""
        arr = self.group[name]
        return int(run(self.group.store.getsize_prefix(f"{name}/c/"))), int(arr.nbytes)

    def missing_chunks(self, name: str, every: bool = False, done: np.ndarray | None = None) -> list[str]:
        """Keys of chunk (or shard) objects of ``name`` that storage lacks: of done shards only, or with
        ``every`` of the whole array (the extra-view arrays, whose shards have their own status)."""
        arr = self.group[name]
        outer = arr.shards or arr.chunks
        prefix = f"{name}/c/"
        present = set(store_keys(self.group.store, prefix))
        done = None if every else (self.shards_done() if done is None else done)
        missing = []
        for coords in itertools.product(*(range(-(-n // s)) for n, s in zip(arr.shape, outer))):
            if not every and name != "labels" and not done[coords[0] * outer[0] // self.shard_samples]:
                continue
            key = prefix + "/".join(map(str, coords))
            if key not in present:
                missing.append(key)
        return missing
