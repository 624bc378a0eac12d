"""Writing a cache: laying out a new Zarr group, writing whole shards and their flags, and growing a
cache (more views, new arrays, the extra views) without touching the chunks it already holds.

Writers own whole shards (zarr-python loses data when two writers share one); a shard is marked done
only after every array of it is written, and the manifest turns ``complete`` last.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from kdcache.cache.arrays import (
    MAX_CHUNK_FILES,
    ArraySpec,
    create_sample_array,
    create_status_array,
    create_view_array,
    default_chunk_samples,
    layout_entry,
)
from kdcache.cache.digests import (
    INPUTS,
    chunk_digests,
    create_digest_array,
    create_inputs_array,
    digest_name,
    shard_inputs,
)
from kdcache.cache.formats import FORMAT_VERSION
from kdcache.cache.manifest import cache_id
from kdcache.cache.storage import MANIFEST_KEY, STATUS_ARRAY, open_group
from kdcache.cache.stored import Cache
from kdcache.errors import CacheCorrupt, DataCorrupt
from kdcache.locations import is_remote


class CacheWriter(Cache):
    """A cache opened for writing: a :class:`Cache`'s reads and integrity questions, and the writes that
    precompute, import, extend, upgrade and repair make. ``open_cache(path, mode="r+")`` and ``create_cache``
    give one."""

    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every per-view array of ``shard`` (with its chunks' digests, and the crc32c of the images its
        views were rendered from where the cache binds its inputs) and then, only then, mark it done."""
        start, stop = self.shard_range(shard)
        wanted = [*self.array_names, *([INPUTS] if self.binds_inputs else [])]
        missing = set(wanted) - set(arrays)
        if missing:
            raise ValueError(f"write_shard({shard}) lacks arrays {sorted(missing)}")
        if self.binds_inputs:
            try:
                self._array(INPUTS)[start:stop] = shard_inputs(arrays[INPUTS])
            except ValueError as exc:
                raise DataCorrupt(f"shard {shard} of cache {self.path}: {exc} — keep the data still while "
                                  "precompute reads it, then rerun") from None
        for name in self.array_names:
            self.write_views(name, start, 0, arrays[name])
        self._array(STATUS_ARRAY)[shard] = 1

    def finish(self) -> None:
        """Mark the cache complete once every shard is done; the last step of a writer."""
        done = self.shards_done()
        if not done.all():
            raise CacheCorrupt(
                f"cache {self.path} has {int((~done).sum())} unfinished shards — rerun precompute to resume"
            )
        self.manifest["status"] = "complete"
        self.manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save_manifest(self.manifest)

    def grow_views(self, views: int) -> None:
        """Resize every per-view array to ``views`` views; the manifest is left as it is.

        Only metadata changes: a chunk holds one view, so the chunks of existing views are untouched
        and readers of those views keep working while new ones are written.
        """
        self._arrays.clear()
        self._index.clear()
        self._digests.clear()
        for name in self.array_names:
            arr = self.group[name]
            arr.resize((arr.shape[0], views, *arr.shape[2:]))
            if self.binds_chunks:
                digest = self.group[digest_name(name)]
                digest.resize((digest.shape[0], views))

    def add_array(self, spec: ArraySpec, views: int) -> None:
        """Create per-view array ``spec`` with ``views`` views, laid out like the others (not yet in the manifest)."""
        layout = self.manifest["layout"]
        self._arrays.pop(spec.name, None)
        self._index.pop(spec.name, None)
        create_view_array(self.group, spec, self.num_samples, views, self.chunk_samples, self.shard_samples,
                           bool(layout.get("sharded")))
        if self.binds_chunks:
            create_digest_array(self.group, spec.name, self.num_samples, views, self.chunk_samples, self.shard_samples)

    def add_view_group(self, prefix: str, specs: Sequence[ArraySpec], indices: np.ndarray, views: int, chunk: int,
                       shard: int) -> None:
        """Per-view arrays ``prefix + name [M, views, ...]`` for the samples ``indices`` (kept as
        ``prefix + "indices"``), chunked ``[chunk, 1, ...]``, and ``prefix + "status"`` with one flag per
        ``shard`` rows: the layout of the energy-guided extra views (kdcache/heda.py)."""
        m = len(indices)
        self._index.clear()
        for spec in specs:
            self._arrays.pop(prefix + spec.name, None)
            create_view_array(self.group, dataclasses.replace(spec, name=prefix + spec.name), m, views, chunk,
                               shard, sharded=False)
            if self.binds_chunks:
                self._digests.pop(prefix + spec.name, None)
                create_digest_array(self.group, prefix + spec.name, m, views, chunk, shard)
        for name in ("indices", "status"):
            self._arrays.pop(prefix + name, None)
        create_sample_array(self.group, prefix + "indices", np.asarray(indices), chunk, shard, sharded=False)
        create_status_array(self.group, prefix + "status", -(-m // shard))

    def remove_partial_files(self) -> int:
        """Delete the ``*.partial`` files a killed writer left in a local cache (Zarr writes each chunk to
        one and renames it); only the writer holding the lock may call this. Returns how many."""
        if is_remote(self.path):
            return 0  # object stores write whole objects: nothing is left half-written
        removed = 0
        for folder, _, files in os.walk(self.path.removeprefix("file://")):
            for name in files:
                if name.endswith(".partial"):
                    os.remove(os.path.join(folder, name))
                    removed += 1
        return removed

    def mark_done(self, status: str, shard: int, done: bool = True) -> None:
        """Set (or with ``done=False`` clear) flag ``shard`` of the status array ``status``: the last write
        of a shard."""
        self._array(status)[shard] = int(done)

    def write_views(self, name: str, start: int, first_view: int, values: np.ndarray) -> None:
        """Write ``values [n, k, ...]`` to samples ``start..start+n`` (``start`` on a chunk boundary) and views
        ``first_view..first_view+k``, and their chunks' digests where the cache binds its chunks."""
        self._index.pop(name, None)
        arr = self._array(name)
        values = np.asarray(values, dtype=arr.dtype)
        arr[start : start + values.shape[0], first_view : first_view + values.shape[1]] = values
        if self.binds_chunks:
            chunk = arr.chunks[0]
            row = start // chunk
            digests = chunk_digests(values, chunk)
            self._digests.pop(name, None)
            self._array(digest_name(name))[row : row + len(digests), first_view : first_view + values.shape[1]] = digests

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest, in today's format (one write of the group's zarr.json, which local
        stores rename into place and object stores put whole): the last step of every writer."""
        manifest["format_version"] = FORMAT_VERSION
        self.manifest = manifest
        self.group.attrs[MANIFEST_KEY] = manifest
        self.stored_format = FORMAT_VERSION

def lay_out(path: str, manifest: dict[str, Any], labels: np.ndarray, specs: Sequence[ArraySpec],
            chunk_samples: int | None, shard_chunks: int, sharded: bool | None,
            overwrite: bool, inputs: bool = False) -> tuple[zarr.Group, dict[str, Any]]:
    """Create the group, ``labels``, every per-view array of ``specs`` with its chunk digests, the shard flags
    and, with ``inputs``, the images' crc32c (kdcache/cache/digests.py) at ``path``; the manifest (given its
    ``layout``, version and id) is written last. Returns both."""
    num_samples = int(manifest["dataset"]["num_samples"])
    views = int(manifest["recipe"]["views"])
    chunk = min(chunk_samples or default_chunk_samples(specs), max(num_samples, 1))
    shard_samples = chunk * shard_chunks
    num_shards = -(-num_samples // shard_samples)
    if sharded is None:
        sharded = -(-num_samples // chunk) * views > MAX_CHUNK_FILES
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["status"] = "writing"
    manifest["layout"] = {
        "chunk_samples": chunk,
        "shard_samples": shard_samples,
        "num_shards": num_shards,
        "sharded": bool(sharded),
        "every_chunk": True,  # every chunk object is written, so a missing one is damage (kdcache/cache/chunks.py)
        "bound": True,  # every chunk's digest is kept beside it (kdcache/cache/digests.py)
        **({"inputs": "crc32c"} if inputs else {}),  # each source image's crc32c is kept: inputs bound
        "arrays": [layout_entry(s) for s in specs],
    }
    manifest["cache_id"] = cache_id(manifest)

    group = open_group(path, "w" if overwrite else "a")
    create_sample_array(group, "labels", np.asarray(labels), chunk, shard_samples, sharded)
    for spec in specs:
        create_view_array(group, spec, num_samples, views, chunk, shard_samples, sharded)
        create_digest_array(group, spec.name, num_samples, views, chunk, shard_samples)
    if inputs:
        create_inputs_array(group, num_samples, chunk, shard_samples)
    create_status_array(group, STATUS_ARRAY, num_shards)
    group.attrs[MANIFEST_KEY] = manifest
    return group, manifest
