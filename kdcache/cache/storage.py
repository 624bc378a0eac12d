"""Where a cache's bytes live: the Zarr store for a path or fsspec URL, and the raw reads that work
before (or without) a valid cache.

Only ``kdcache.cache`` opens stores; local folders, ``memory://`` and object stores such as
``s3://bucket/prefix`` look the same from here on.
"""

from __future__ import annotations

from typing import Any

import zarr
import zarr.storage

from kdcache.locations import guard, is_remote, local_path, require_driver, unreachable

MANIFEST_KEY = "kdcache"
STATUS_ARRAY = "status/shards"

#: What opening a group raises when there is none (or not a valid one) at a path.
NO_GROUP = (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, KeyError, ValueError)


def run(coroutine: Any) -> Any:
    """Run one of zarr's coroutines (a store's ``get``, ``list_prefix``, ``getsize_prefix``; concurrent array
    reads) to completion on zarr's own event loop, and return its result.

    zarr-python 3 offers these only as coroutines, and its stores are bound to the loop zarr runs them on, so
    they cannot be given to ``asyncio.run``. zarr has no public entry point for this (3.1), so this is the one
    place kdcache uses its private ``zarr.core.sync.sync``.
    """
    from zarr.core.sync import sync

    return sync(coroutine)


def open_store(path: str, read_only: bool) -> zarr.abc.store.Store:
    """The Zarr store of a local folder or an fsspec URL."""
    guard(path, "cache")
    if is_remote(path):
        require_driver(path)
        return zarr.storage.FsspecStore.from_url(path, storage_options=storage_options(path), read_only=read_only)
    return zarr.storage.LocalStore(local_path(path), read_only=read_only)


def storage_options(url: str) -> dict[str, Any] | None:
    """fsspec options for ``url``. On S3, one request per object read: s3fs's concurrent download (for
    objects larger than its block size, which no chunk or zarr.json is) first asks every object's size
    with a HEAD, a second request per read."""
    if url.startswith(("s3://", "s3a://")):
        import inspect

        require_driver(url)
        import s3fs

        if "max_concurrency" in inspect.signature(s3fs.S3FileSystem.__init__).parameters:
            return {"max_concurrency": 1}
    return None


def open_group(path: str, mode: str) -> zarr.Group:
    """The Zarr v3 group at ``path`` (``mode`` "r", "r+", "a" or "w"); raises one of :data:`NO_GROUP`, or for a
    store that refuses (credentials, network) one line saying so."""
    store = open_store(path, read_only=mode == "r")
    try:
        return zarr.open_group(store, mode=mode, zarr_format=3)
    except NO_GROUP:
        raise
    except Exception as exc:  # noqa: BLE001 - a remote store's refusal in one line; a local error is a bug
        if not is_remote(path) or isinstance(exc, RecursionError):
            raise
        raise unreachable(path, exc) from None


def check_root(root: str) -> None:
    """Refuse a cache given where the root folder caches are kept under is expected (``--out``)."""
    from kdcache.errors import InvalidSpec

    if cache_exists(root):
        raise InvalidSpec(f"--out {root} is itself a cache; --out is the root folder caches are kept under "
                          "— pass its parent folder")


def cache_exists(path: str) -> bool:
    """Whether ``path`` holds any Zarr group (complete or not)."""
    try:
        open_group(str(path), "r")
        return True
    except NO_GROUP:
        return False


def group_metadata(path: str) -> bytes | None:
    """The raw bytes of the group's zarr.json, or None when there is none."""
    from zarr.buffer import default_buffer_prototype

    try:
        found = run(open_store(path, read_only=True).get("zarr.json", prototype=default_buffer_prototype()))
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None
    return None if found is None else found.to_bytes()


def manifest_at(path: str) -> dict[str, Any] | None:
    """The manifest stored at ``path`` as written (no normalisation), or None when there is none."""
    try:
        group = open_group(path, "r")
    except NO_GROUP:
        return None
    manifest = group.attrs.get(MANIFEST_KEY)
    return manifest if isinstance(manifest, dict) else None


def limit_codec_threads(threads: int | None) -> None:
    """Let Zarr encode and decode chunks on at most ``threads`` threads in this process (None: leave
    Zarr's default).

    On a CPU the model's threads need the cores: Zarr's default pool (cores + 4 threads) compresses a
    shard in a burst that preempts them (docs/benchmarks.md). A limit the user set already (Zarr's
    ``threading.max_workers``, e.g. ``ZARR_THREADING__MAX_WORKERS``) is kept. Zarr builds its pool at
    the next read or write and keeps it for the life of the process.
    """
    if threads is not None and zarr.config.get("threading.max_workers", None) is None:
        zarr.config.set({"threading.max_workers": max(1, int(threads))})
