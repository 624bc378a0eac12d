"""Opening and creating caches: a Zarr v3 group holding teacher outputs per (sample, view).

Nothing outside ``kdcache.cache`` touches Zarr or the storage behind it. Layout (docs/format.md is the
complete specification):

- ``labels [N]`` and, per stored output, an array ``[N, K, ...]`` chunked ``[S, 1, ...]`` along the
  sample and view axes (kdcache/cache/arrays.py). With more than ``MAX_CHUNK_FILES`` chunks per array,
  chunks are packed into Zarr shards of exactly one writer shard (``[shard_samples, K, ...]``).
- ``status/shards [num_shards]``: one uint8 per shard, set to 1 only after every array of that
  shard is written. Each element is its own chunk, so writers of different shards never touch the
  same object.
- group attribute ``kdcache``: the JSON manifest (kdcache/cache/manifest.py), in the format of
  kdcache/cache/formats.py. ``status`` becomes ``complete`` only after the last shard is marked done.

:class:`Cache` is the type of a cache opened for reading: reads (kdcache/cache/reading.py) and what lies in
storage (kdcache/cache/stored.py), no writes. :class:`CacheWriter` (kdcache/cache/writing.py) adds the writes;
only ``open_cache(path, mode="r+")`` and ``create_cache`` give one. A cache lives at ``ROOT/<cache id>`` with
an alias beside it (kdcache/cache/roots.py).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from kdcache.cache.arrays import ArraySpec
from kdcache.cache.formats import FORMAT_VERSION, check_keys, check_shape, normalise, stored_version
from kdcache.cache.roots import check_cache_id, resolve, where_caches_are
from kdcache.cache.storage import (
    MANIFEST_KEY,
    NO_GROUP,
    STATUS_ARRAY,
    cache_exists,
    check_root,
    group_metadata,
    limit_codec_threads,
    manifest_at,
    open_group,
)
from kdcache.cache.stored import Cache
from kdcache.cache.writing import CacheWriter, lay_out
from kdcache.errors import CacheCorrupt, CacheMismatch, InterruptedLayout, MissingData, UnsupportedFormat

__all__ = ["MANIFEST_KEY", "STATUS_ARRAY", "Cache", "CacheWriter", "cache_exists", "check_root", "create_cache",
           "limit_codec_threads", "open_cache", "open_writer"]


def create_cache(
    path: str,
    manifest: dict[str, Any],
    labels: np.ndarray,
    specs: list[ArraySpec],
    chunk_samples: int | None = None,
    shard_chunks: int = 4,
    sharded: bool | None = None,
    overwrite: bool = False,
    inputs: bool = False,
) -> CacheWriter:
    """Lay out a new cache at ``path`` with status ``writing``; refuses to overwrite a cache unless
    ``overwrite`` (``precompute --rebuild``: everything at ``path`` is deleted first).

    The manifest is written last, so a Zarr group at ``path`` without one is a layout whose creation
    was interrupted: it is rebuilt array by array (the folder itself is kept, and with it a writer's
    lock file). ``sharded=None`` packs chunks into Zarr shards when an array would otherwise have
    more than ``MAX_CHUNK_FILES`` chunk files. With ``inputs`` the cache keeps the crc32c of every source
    image its shards were rendered from (kdcache/cache/digests.py): ``write_shard`` then takes them.
    """
    if not overwrite and manifest_at(path) is not None:
        raise CacheMismatch(f"{path} already holds a cache — choose another --out or delete it")
    group, manifest = lay_out(path, manifest, labels, specs, chunk_samples, shard_chunks, sharded, overwrite, inputs)
    return CacheWriter(path, group, manifest)


def open_cache(path: str, mode: str = "r", allow_incomplete: bool = False) -> Cache:
    """Open the cache at a path or URL — ``ROOT/<id>`` or an alias ``ROOT/<alias>`` — for reading
    (``"r"``: a :class:`Cache`, which cannot write) or for writing (``"r+"``: a :class:`CacheWriter`).

    A manifest of an older format is read in today's form (kdcache/cache/formats.py); the cache's
    ``stored_format`` says what is stored. Refuses a cache of a newer format, a folder that is not a
    kdcache cache and, unless ``allow_incomplete``, a cache whose writer has not finished.
    """
    path = resolve(str(path))
    try:
        group = open_group(path, mode)
    except RecursionError:
        raise CacheCorrupt(f"cache {path}: its zarr.json nests deeper than a JSON reader allows — the file is damaged or "
                           "was edited; rebuild the cache with precompute --rebuild") from None
    except NO_GROUP as exc:
        if group_metadata(path) is not None:
            raise CacheCorrupt(f"cache {path}: its zarr.json (the group metadata holding the manifest) is not valid "
                               "Zarr JSON — the cache is damaged; rebuild it with precompute --rebuild") from None
        raise MissingData(f"no cache at {path} — {where_caches_are(path)}") from exc
    manifest = group.attrs.get(MANIFEST_KEY)
    if not isinstance(manifest, dict):
        raise InterruptedLayout(f"{path} is a Zarr group without a kdcache manifest: a precompute that was "
                                "interrupted before it wrote one (rerun it to rebuild), or not a kdcache cache")
    version = stored_version(manifest)
    if version is None or version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"cache {path} has format_version {manifest.get('format_version')}, this kdcache reads up to "
            f"{FORMAT_VERSION} — upgrade kdcache"
        )
    kind = CacheWriter if mode != "r" else Cache
    check_keys(manifest, version, f"the manifest of {path}")
    normalised = normalise(manifest)
    check_cache_id(normalised.get("cache_id"), f"the manifest of {path}")
    check_shape(normalised, f"the manifest of {path}")
    cache = kind(path, group, normalised, stored_format=version)
    if not allow_incomplete and not cache.complete:
        done = int(cache.shards_done().sum())
        raise CacheCorrupt(
            f"cache {path} is incomplete ({done}/{cache.num_shards} shards written) — "
            "rerun the same precompute command to finish it"
        )
    return cache


def open_writer(path: str, allow_incomplete: bool = False) -> CacheWriter:
    """The cache at ``path`` opened for writing (``open_cache(path, mode="r+")``): only writers that hold its
    lock (kdcache/cache/claim.py) open one."""
    return cast(CacheWriter, open_cache(path, mode="r+", allow_incomplete=allow_incomplete))
