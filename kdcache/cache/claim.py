"""The one way a writer claims a cache: id → path → reuse a whole one, or lock → create or resume → repair
→ alias. Precompute, import and extend all claim through here, with the same options (:class:`ClaimOptions`:
``--wait``, ``--break-lock``, ``--rebuild``) and the same one-line errors.

A complete cache that is whole (every shard flag set, every chunk object there) is reused without a lock:
readers never lock, and may lack write permission. Anything else is locked (kdcache/cache/lock.py) before it
is looked at again, since the writer waited for may have finished it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.cache.arrays import ArraySpec
from kdcache.cache.integrity import damaged_shards, reopen_shards
from kdcache.cache.lock import WriterLock
from kdcache.cache.manifest import cache_id
from kdcache.cache.roots import alias_name, join, write_alias
from kdcache.cache.store import CacheWriter, check_root, create_cache, open_cache, open_writer
from kdcache.errors import CacheCorrupt, CacheMismatch, InterruptedLayout, KdcacheError, MissingData


@dataclass(frozen=True)
class ClaimOptions:
    """How a writer claims a cache that another writer holds, or that is damaged."""

    wait: bool = False  # another writer holds it: wait for it instead of stopping
    break_lock: bool = False  # remove the lock of a writer whose heartbeat stopped
    rebuild: bool = False  # delete whatever lies at ROOT/<id> and write it anew


@dataclass
class Claim:
    """A claimed cache: reused (``lock`` None, complete) or held for writing until :meth:`release`."""

    cache: CacheWriter
    alias: str
    lock: WriterLock | None

    @property
    def reused(self) -> bool:
        return self.lock is None and self.cache.complete

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock(path: str, options: ClaimOptions) -> WriterLock:
    """The writer lock of the cache at ``path``, taken as ``options`` say (one line when another holds it)."""
    return WriterLock(path, wait=options.wait, break_stale=options.break_lock).acquire()


def claim(root: str, manifest: dict[str, Any], labels: np.ndarray, specs: list[ArraySpec],
          options: ClaimOptions = ClaimOptions(), chunk_samples: int | None = None,
          sharded: bool | None = None, inputs: bool = False) -> Claim:
    """The cache ``manifest`` describes under ``root``: a whole one reused, else locked and created or resumed
    (``chunk_samples``, ``sharded`` and ``inputs`` lay a new one out; see kdcache/cache/store.py)."""
    check_root(root)
    path = join(root, cache_id(manifest))
    held = lock(path, options) if options.rebuild or not is_whole(path) else None
    try:
        cache = _open_or_create(path, manifest, labels, specs, options.rebuild, (chunk_samples, sharded, inputs),
                                repair=held is not None)
    except BaseException:
        if held is not None:
            held.release()
        raise
    if cache.complete and held is not None:
        held.release()
        held = None
    return Claim(cache, write_alias(root, alias_name(manifest, cache.id), cache.id), held)


def is_whole(path: str) -> bool:
    """Whether ``path`` holds a complete cache that is whole: every flag set, every chunk object there."""
    try:
        cache = open_cache(path, allow_incomplete=True)
        return cache.complete and not _damaged(cache)
    except KdcacheError:
        return False


def _damaged(cache: CacheWriter) -> list[int]:
    """Shards of a complete cache that lost a chunk (or, for caches without chunk checks, a flag)."""
    return damaged_shards(cache) if cache.check_chunks else np.flatnonzero(~cache.shards_done()).tolist()


def _open_or_create(path: str, manifest: dict[str, Any], labels: np.ndarray, specs: list[ArraySpec], rebuild: bool,
                    layout: tuple[int | None, bool | None, bool], repair: bool) -> CacheWriter:
    wanted = cache_id(manifest)
    try:
        if rebuild:
            raise MissingData(path)
        cache = open_writer(path, allow_incomplete=True)
    except (MissingData, InterruptedLayout):  # nothing there yet, or a layout whose creation was interrupted
        chunk_samples, sharded, inputs = layout
        cache = create_cache(path, manifest, labels, specs, chunk_samples=chunk_samples, sharded=sharded,
                             overwrite=rebuild, inputs=inputs)
    if not cache.complete:
        cache.remove_partial_files()  # chunks a killed writer left half-written; their shards are rewritten
    if repair and cache.complete:  # found damaged: rewrite the shards that lost a chunk, refuse worse damage
        reopen_shards(cache, _damaged(cache))
    if cache.id != wanted and any(h.get("previous_id") == wanted for h in cache.manifest.get("history", [])):
        raise CacheMismatch(f"{path} was extended into cache {cache.id} ({cache.views} views), which holds every view "
                            f"of {wanted} — train from it, or write into another --out to rebuild {wanted}")
    if cache.id != wanted:
        raise CacheCorrupt(f"{path} holds cache {cache.id}, not {wanted} as its name says — delete that folder")
    return cache
