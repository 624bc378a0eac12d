"""Opening, creating and writing caches: a Zarr v3 group holding teacher outputs per (sample, view).

Nothing outside ``kdcache.cache`` touches Zarr or the storage behind it. Layout (docs/format.md is the
complete specification):

- ``labels [N]`` and, per stored output, an array ``[N, K, ...]`` chunked ``[S, 1, ...]`` along the
  sample and view axes (kdcache/cache/arrays.py). With more than ``MAX_CHUNK_FILES`` chunks per array,
  chunks are packed into Zarr shards of exactly one writer shard (``[shard_samples, K, ...]``).
- ``status/shards [num_shards]``: one uint8 per shard, set to 1 only after every array of that
  shard is written. Each element is its own chunk, so writers of different shards never touch the
  same object.
- group attribute ``kdcache``: the JSON manifest (kdcache/cache/manifest.py). ``status`` becomes
  ``complete`` only after the last shard is marked done.

A cache lives at ``ROOT/<cache id>`` with an alias beside it (kdcache/cache/roots.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from collections.abc import Callable
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import zarr
import zarr.storage
from zarr.core.sync import sync

from kdcache.cache.arrays import (
    MAX_CHUNK_FILES,
    ArraySpec,
    create_sample_array,
    create_status_array,
    create_view_array,
    default_chunk_samples,
    layout_entry,
    spec_from_entry,
)
from kdcache.cache.chunks import REPAIR, ChunkIndex, damaged_error, missing_error
from kdcache.cache.logits import TARGET_ARRAYS, decode_logits, densify
from kdcache.cache.manifest import FORMAT_VERSION, cache_id, check_dataset
from kdcache.cache.roots import resolve, where_caches_are
from kdcache.errors import (
    CacheCorrupt,
    CacheMismatch,
    InterruptedLayout,
    KdcacheError,
    MissingData,
    UnsupportedFormat,
)

MANIFEST_KEY = "kdcache"
STATUS_ARRAY = "status/shards"


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _open_store(path: str, read_only: bool) -> zarr.abc.store.Store:
    if _is_url(path):
        return zarr.storage.FsspecStore.from_url(path, storage_options=_storage_options(path), read_only=read_only)
    local = path.removeprefix("file://")
    return zarr.storage.LocalStore(local, read_only=read_only)


def _storage_options(url: str) -> dict[str, Any] | None:
    """fsspec options for ``url``. On S3, one request per object read: s3fs's concurrent download (for
    objects larger than its block size, which no chunk or zarr.json is) first asks every object's size
    with a HEAD, a second request per read."""
    if url.startswith(("s3://", "s3a://")):
        import inspect

        import s3fs

        if "max_concurrency" in inspect.signature(s3fs.S3FileSystem.__init__).parameters:
            return {"max_concurrency": 1}
    return None


def _exists(path: str) -> bool:
    try:
        zarr.open_group(_open_store(path, read_only=True), mode="r", zarr_format=3)
        return True
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False


def _group_metadata(path: str) -> bytes | None:
    """The raw bytes of the group's zarr.json, or None when there is none."""
    from zarr.core.buffer import default_buffer_prototype

    try:
        found = sync(_open_store(path, read_only=True).get("zarr.json", prototype=default_buffer_prototype()))
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None
    return None if found is None else found.to_bytes()


def _manifest_at(path: str) -> dict[str, Any] | None:
    try:
        group = zarr.open_group(_open_store(path, read_only=True), mode="r", zarr_format=3)
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return None
    manifest = group.attrs.get(MANIFEST_KEY)
    return manifest if isinstance(manifest, dict) else None


def cache_exists(path: str) -> bool:
    """Whether ``path`` holds any Zarr group (complete or not)."""
    return _exists(str(path))


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


class Cache:
    """An open cache: its manifest and typed, block-wise access to what it stores."""

    def __init__(self, path: str, group: zarr.Group, manifest: dict[str, Any]):
        self.path = path
        self.group = group
        self.manifest = manifest
        self._arrays: dict[str, zarr.Array] = {}
        self._index: dict[str, ChunkIndex] = {}
        #: Every data read refuses chunks whose objects are missing (kdcache/cache/chunks.py); ``verify``,
        #: which reports them itself, turns this off. Caches written before 0.2 may lack chunks that
        #: equal the fill value, so for them a missing object is not damage.
        self.check_chunks = bool(manifest.get("layout", {}).get("every_chunk"))

    def _array(self, name: str) -> zarr.Array:
        """Array ``name``, opened once: opening reads its metadata object, a storage round trip."""
        arr = self._arrays.get(name)
        if arr is None:
            try:
                # write_empty_chunks is a setting of the open array, not of its metadata: set it on every open
                arr = self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
            except KeyError:
                raise CacheCorrupt(f"cache {self.path} lacks array {name} (its zarr.json is missing) — the cache is "
                                   "damaged; rebuild it with precompute --rebuild") from None
            except ValueError as exc:
                raise damaged_error(self.path, name, "metadata (zarr.json)", exc) from None
        return arr

    def _chunk_index(self, name: str) -> ChunkIndex:
        index = self._index.get(name)
        if index is None:
            index = self._index[name] = ChunkIndex(self._array(name), name)
        return index

    def _present(self, name: str, samples: np.ndarray | slice, views: np.ndarray | int | None = None) -> None:
        """Refuse a read touching a chunk whose object is missing: Zarr would return zeros."""
        if self.check_chunks:
            key = self._chunk_index(name).first_missing(samples, views)
            if key is not None:
                raise missing_error(self.path, name, key)

    def _decoded(self, name: str, where: str, read: Callable[[], Any]) -> np.ndarray:
        """``read()`` as an array; a chunk that fails its checksum or codec is one CacheCorrupt line."""
        try:
            return np.asarray(read())
        except KdcacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - checksum, codec and truncation errors are all damage
            raise damaged_error(self.path, name, where, exc) from None

    def check_readable(self, names: Iterable[str] | None = None) -> None:
        """Refuse, in one line, a cache whose bookkeeping says it is not whole: a shard flag that is not
        set in a complete cache, an array without metadata, or a missing chunk object of ``names``
        (default: every per-view array). Readers call it before they start."""
        done = self.shards_done()
        if not done.all():
            first = int(np.flatnonzero(~done)[0])
            raise CacheCorrupt(f"cache {self.path} says it is complete but {STATUS_ARRAY} marks shard {first} "
                               f"({int((~done).sum())} of {len(done)}) unwritten — " + REPAIR.format(path=self.path))
        for name in ["labels", *(self.array_names if names is None else names)]:
            self._present(name, slice(0, self.num_samples))

    # ---- what the cache describes -------------------------------------------------------
    @property
    def id(self) -> str:
        return self.manifest["cache_id"]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["dataset"]["num_samples"])

    @property
    def views(self) -> int:
        return int(self.manifest["recipe"]["views"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["dataset"]["num_classes"])

    @property
    def chunk_samples(self) -> int:
        return int(self.manifest["layout"]["chunk_samples"])

    @property
    def shard_samples(self) -> int:
        return int(self.manifest["layout"]["shard_samples"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_samples)

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def array_names(self) -> list[str]:
        return [spec["name"] for spec in self.manifest["layout"]["arrays"]]

    @property
    def logit_mode(self) -> str:
        """``dense``, ``topk`` or ``sampled``."""
        return self.manifest["outputs"]["logits"]["mode"]

    @property
    def dense_logits(self) -> bool:
        return self.logit_mode == "dense"

    @property
    def logit_dtype(self) -> str | None:
        """Logical dtype of stored logits (dense values or top-k log-probabilities); None for sampled."""
        return self.manifest["outputs"]["logits"].get("dtype")

    def array_specs(self) -> list[ArraySpec]:
        """The per-view arrays ``[N, K, ...]`` the manifest's layout lists."""
        return [spec_from_entry(entry) for entry in self.manifest["layout"]["arrays"]]

    def expected_arrays(self) -> dict[str, tuple[tuple[int, ...], str, str]]:
        """name -> (shape, Zarr dtype, logical dtype) of ``labels`` and every per-view array the layout lists."""
        return _expected("labels", self.num_samples, self.views, self.array_specs())

    def expected_extra_arrays(self) -> dict[str, tuple[tuple[int, ...], str, str]]:
        """The same for the extra views (``he/indices`` and ``he/<array>``); empty without them."""
        he = self.manifest.get("he")
        if not he:
            return {}
        return _expected("he/indices", int(he["samples"]), int(he["views"]), [spec_from_entry(e) for e in he["arrays"]])

    def check_dataset(self, spec: str, fingerprint: str, num_classes: int, num_samples: int) -> None:
        """Refuse a dataset other than the one this cache was made from (CacheMismatch, one line)."""
        check_dataset(self.manifest, self.path, spec, fingerprint, num_classes, num_samples)

    def target_arrays(self) -> list[str]:
        """Names of the arrays that hold the teacher target in this cache's logit mode."""
        return list(TARGET_ARRAYS[self.logit_mode])

    def feature_layers(self) -> dict[str, dict[str, Any]]:
        """Cached feature layers: layer -> {"array": "features/<layer>", "mode": ..., "shape": [...]}."""
        return {f["layer"]: {"array": f["array"], "mode": f["mode"], "shape": list(f["shape"])}
                for f in self.manifest["outputs"].get("features", [])}

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_samples
        return start, min(start + self.shard_samples, self.num_samples)

    # ---- reading ------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        self._present("labels", slice(0, self.num_samples))
        return self._decoded("labels", "", lambda: self._array("labels")[:]).astype(np.int64)

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

    def read_block(self, names: Iterable[str], start: int, stop: int, view: int) -> dict[str, np.ndarray]:
        """Arrays ``name[start:stop, view]``: one decode per chunk, the access pattern of training."""
        return self.read_blocks(list(names), [(start, stop, view)])[0]

    def read_blocks(self, names: Sequence[str], blocks: Sequence[tuple[int, int, int]]) -> list[dict[str, np.ndarray]]:
        """Arrays ``name[start:stop, view]`` for every ``(start, stop, view)`` of ``blocks``, in one round.

        Every (array, block) read is issued at once, so storage latency (S3 requests, disk seeks) and
        Zarr's per-call overhead are paid once per round rather than once per array and block.
        """
        if self.check_chunks:
            for name in names:
                index = self._chunk_index(name)
                for start, stop, view in blocks:
                    key = index.block_missing(start, stop, view)
                    if key is not None:
                        raise missing_error(self.path, name, key)
        arrays = [self._array(name).async_array for name in names]

        async def gather() -> list[Any]:
            return await asyncio.gather(*(arr.getitem((slice(start, stop), view))
                                          for start, stop, view in blocks for arr in arrays))

        flat = iter(self._gathered(names, blocks, gather))
        return [{name: np.asarray(next(flat)) for name in names} for _ in blocks]

    def _gathered(self, names: Sequence[str], blocks: Sequence[tuple[int, int, int]],
                  gather: Callable[[], Any]) -> list[Any]:
        """The reads of :meth:`read_blocks`; a read that fails is repeated block by block to name the chunk."""
        try:
            return sync(gather())
        except Exception as first:  # noqa: BLE001 - checksum, codec and truncation errors are all damage
            for start, stop, view in blocks:
                for name in names:
                    try:
                        self._array(name)[start:stop, view]
                    except Exception as exc:  # noqa: BLE001
                        raise damaged_error(self.path, name, f"chunk {self.chunk_key(name, start, view)}",
                                            exc) from None
            raise damaged_error(self.path, ", ".join(names), "", first) from None

    def has_array(self, name: str) -> bool:
        return name in self.group

    def read_array(self, name: str) -> np.ndarray:
        """The whole of array ``name`` (for small bookkeeping arrays such as ``he/indices``)."""
        arr = self._array(name)
        if name.endswith("status"):  # a flag never written reads as "not done", which is what it is
            return self._decoded(name, "", lambda: arr[...])
        self._present(name, slice(0, arr.shape[0]))
        return self._decoded(name, "", lambda: arr[...])

    def read_samples(self, name: str, start: int, stop: int) -> np.ndarray:
        """Array ``name[start:stop]`` with every view."""
        self._present(name, slice(start, stop))
        return self._decoded(name, f"samples {start}..{stop - 1}", lambda: self._array(name)[start:stop])

    def read_views(self, name: str, indices: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Array ``name`` at arbitrary (sample, view) pairs; slower than :meth:`read_block`."""
        samples, at_sample = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        picked, at_view = np.unique(np.asarray(views, dtype=np.int64), return_inverse=True)
        self._present(name, samples, picked)
        block = self._decoded(name, "", lambda: self._array(name).get_orthogonal_selection((samples, picked)))
        return block[at_sample.reshape(-1), at_view.reshape(-1)]

    def logits(self, indices: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Dense teacher logits [B, C] as float32 for the given (sample, view) pairs."""
        if not self.dense_logits:
            raise CacheMismatch(f"cache {self.path} stores {self.logit_mode} logits, not dense ones — "
                                "use targets() for probabilities, or re-run precompute with --logits dense")
        return decode_logits(self.read_views("logits", indices, views), self.logit_dtype)

    def teacher_probs(self, block: Mapping[str, np.ndarray], temperature: float = 1.0) -> np.ndarray:
        """Dense teacher probabilities [..., C] float32 from a block of :meth:`target_arrays` (see :func:`densify`)."""
        return densify(self.manifest["outputs"]["logits"], self.num_classes, block, temperature)

    def targets(self, indices: np.ndarray, views: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Dense teacher probabilities [B, C] float32 at (sample, view) pairs, for any logit mode."""
        block = {name: self.read_views(name, indices, views) for name in self.target_arrays()}
        return self.teacher_probs(block, temperature)

    def features(self, layer: str, indices: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Cached feature output of ``layer`` [B, *shape] as float32."""
        layers = self.feature_layers()
        if layer not in layers:
            raise CacheMismatch(f"cache {self.path} has no features of layer {layer!r} (it has: "
                                f"{', '.join(layers) or 'none'}) — re-run precompute with --features {layer}")
        return self.read_views(layers[layer]["array"], indices, views).astype(np.float32)

    def energy(self, indices: np.ndarray, views: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Teacher energy ``-T·logsumexp(z/T)``: [B] at ``temperature``, or [B, nT] for all stored T."""
        values = self.read_views("energy", indices, views)
        if temperature is None:
            return values
        return values[:, self.energy_column(temperature)]

    def energy_column(self, temperature: float) -> int:
        temps = [float(t) for t in self.manifest["outputs"]["energy"]["temperatures"]]
        if float(temperature) not in temps:
            raise CacheMismatch(
                f"cache {self.path} has energy at T={temps}, not T={temperature} — "
                f"re-run precompute with --energy-t {temperature}"
            )
        return temps.index(float(temperature))

    def all_energy(self, temperature: float) -> np.ndarray:
        """Energies of every stored view [N, K] at ``temperature`` (for dataset-level thresholds)."""
        column = self.energy_column(temperature)
        self._present("energy", slice(0, self.num_samples))
        return self._decoded("energy", "", lambda: self._array("energy")[:, :, column])

    def aug_params(self, indices: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Augmentation params of the given (sample, view) pairs, field -> [B, *tail]."""
        return {
            name.removeprefix("aug/"): self.read_views(name, indices, views)
            for name in self.array_names
            if name.startswith("aug/")
        }

    # ---- what lies in storage (for inspection and verification) --------------------------
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
        return int(sync(self.group.store.getsize_prefix(f"{name}/c/"))), int(arr.nbytes)

    def chunk_key(self, name: str, sample: int, view: int = 0) -> str:
        """Storage key (relative to the cache) of the chunk holding ``name[sample, view]``."""
        arr = self.group[name]
        point = (sample, view)[: arr.ndim] + (0,) * max(arr.ndim - 2, 0)
        outer = arr.shards or arr.chunks
        key = f"{name}/c/" + "/".join(str(p // s) for p, s in zip(point, outer))
        if arr.shards:
            inner = ",".join(str(p // s) for p, s in zip(point, arr.chunks))
            key += f" (inner chunk {inner})"
        return key

    def missing_chunks(self, name: str, every: bool = False, done: np.ndarray | None = None) -> list[str]:
        """Keys of chunk (or shard) objects of ``name`` that storage lacks: of done shards only, or with
        ``every`` of the whole array (the extra-view arrays, whose shards have their own status)."""
        arr = self.group[name]
        outer = arr.shards or arr.chunks
        prefix = f"{name}/c/"

        async def listing() -> set[str]:
            return {key async for key in self.group.store.list_prefix(prefix)}

        present = sync(listing())
        done = None if every else (self.shards_done() if done is None else done)
        missing = []
        for coords in itertools.product(*(range(-(-n // s)) for n, s in zip(arr.shape, outer))):
            if not every and name != "labels" and not done[coords[0] * outer[0] // self.shard_samples]:
                continue
            key = prefix + "/".join(map(str, coords))
            if key not in present:
                missing.append(key)
        return missing

    # ---- writing ------------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every per-view array of ``shard`` and then, only then, mark it done."""
        start, stop = self.shard_range(shard)
        missing = set(self.array_names) - set(arrays)
        if missing:
            raise ValueError(f"write_shard({shard}) lacks arrays {sorted(missing)}")
        for name in self.array_names:
            self._index.pop(name, None)
            self._array(name)[start:stop] = arrays[name]
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
        self.group.attrs[MANIFEST_KEY] = self.manifest

    # ---- growing (kdcache/extend.py) ---------------------------------------------------------
    def grow_views(self, views: int) -> None:
        """Resize every per-view array to ``views`` views; the manifest is left as it is.

        Only metadata changes: a chunk holds one view, so the chunks of existing views are untouched
        and readers of those views keep working while new ones are written.
        """
        self._arrays.clear()
        self._index.clear()
        for name in self.array_names:
            arr = self.group[name]
            arr.resize((arr.shape[0], views, *arr.shape[2:]))

    def add_array(self, spec: ArraySpec, views: int) -> None:
        """Create per-view array ``spec`` with ``views`` views, laid out like the others (not yet in the manifest)."""
        layout = self.manifest["layout"]
        self._arrays.pop(spec.name, None)
        self._index.pop(spec.name, None)
        create_view_array(self.group, spec, self.num_samples, views, self.chunk_samples, self.shard_samples,
                           bool(layout.get("sharded")))

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
        for name in ("indices", "status"):
            self._arrays.pop(prefix + name, None)
        create_sample_array(self.group, prefix + "indices", np.asarray(indices), chunk, shard, sharded=False)
        create_status_array(self.group, prefix + "status", -(-m // shard))

    def remove_partial_files(self) -> int:
        """Delete the ``*.partial`` files a killed writer left in a local cache (Zarr writes each chunk to
        one and renames it); only the writer holding the lock may call this. Returns how many."""
        if _is_url(self.path):
            return 0  # object stores write whole objects: nothing is left half-written
        removed = 0
        for folder, _, files in os.walk(self.path.removeprefix("file://")):
            for name in files:
                if name.endswith(".partial"):
                    os.remove(os.path.join(folder, name))
                    removed += 1
        return removed

    def read_flag(self, shard: int) -> bool:
        """Flag ``shard`` of the shard status alone; CacheCorrupt when its chunk does not decode."""
        return bool(self._decoded(STATUS_ARRAY, f"chunk {STATUS_ARRAY}/c/{shard}",
                                  lambda: self._array(STATUS_ARRAY)[shard]))

    def mark_done(self, status: str, shard: int, done: bool = True) -> None:
        """Set (or with ``done=False`` clear) flag ``shard`` of the status array ``status``: the last write
        of a shard."""
        self._array(status)[shard] = int(done)

    def write_views(self, name: str, start: int, first_view: int, values: np.ndarray) -> None:
        """Write ``values [n, k, ...]`` to samples ``start..start+n`` and views ``first_view..first_view+k``."""
        self._index.pop(name, None)
        self._array(name)[start : start + values.shape[0], first_view : first_view + values.shape[1]] = values

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest: the last step of an extension."""
        self.manifest = manifest
        self.group.attrs[MANIFEST_KEY] = manifest


def _expected(rows_array: str, rows: int, views: int,
              specs: Sequence[ArraySpec]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (shape, Zarr dtype, logical dtype): the int64 per-row array and the per-view ``specs``."""
    out = {rows_array: ((rows,), "int64", "int64")}
    for spec in specs:
        out[spec.name] = ((rows, views, *spec.tail), spec.dtype, spec.logical or spec.dtype)
    return out


def create_cache(
    path: str,
    manifest: dict[str, Any],
    labels: np.ndarray,
    specs: list[ArraySpec],
    chunk_samples: int | None = None,
    shard_chunks: int = 4,
    sharded: bool | None = None,
    overwrite: bool = False,
) -> Cache:
    """Lay out a new cache at ``path`` with status ``writing``; refuses to overwrite a cache unless
    ``overwrite`` (``precompute --rebuild``: everything at ``path`` is deleted first).

    The manifest is written last, so a Zarr group at ``path`` without one is a layout whose creation
    was interrupted: it is rebuilt array by array (the folder itself is kept, and with it a writer's
    lock file). ``sharded=None`` packs chunks into Zarr shards when an array would otherwise have
    more than ``MAX_CHUNK_FILES`` chunk files.
    """
    if not overwrite and _manifest_at(path) is not None:
        raise CacheMismatch(f"{path} already holds a cache — choose another --out or delete it")
    num_samples = int(manifest["dataset"]["num_samples"])
    views = int(manifest["recipe"]["views"])
    chunk = chunk_samples or default_chunk_samples(specs)
    chunk = min(chunk, max(num_samples, 1))
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
        "arrays": [layout_entry(s) for s in specs],
    }
    manifest["cache_id"] = cache_id(manifest)

    group = zarr.open_group(_open_store(path, read_only=False), mode="w" if overwrite else "a", zarr_format=3)
    create_sample_array(group, "labels", np.asarray(labels), chunk, shard_samples, sharded)
    for spec in specs:
        create_view_array(group, spec, num_samples, views, chunk, shard_samples, sharded)
    create_status_array(group, STATUS_ARRAY, num_shards)
    group.attrs[MANIFEST_KEY] = manifest
    return Cache(path, group, manifest)


def open_cache(path: str, mode: str = "r", allow_incomplete: bool = False) -> Cache:
    """Open the cache at a path or URL — ``ROOT/<id>`` or an alias ``ROOT/<alias>`` — for reading
    (``"r"``) or for resuming a write (``"r+"``).

    Refuses a cache of a newer format, a folder that is not a kdcache cache and, unless
    ``allow_incomplete``, a cache whose writer has not finished.
    """
    path = resolve(str(path))
    try:
        group = zarr.open_group(_open_store(path, read_only=mode == "r"), mode=mode, zarr_format=3)
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as exc:
        if _group_metadata(path) is not None:
            raise CacheCorrupt(f"cache {path}: its zarr.json (the group metadata holding the manifest) is not valid "
                               "Zarr JSON — the cache is damaged; rebuild it with precompute --rebuild") from None
        raise MissingData(f"no cache at {path} — {where_caches_are(path)}") from exc
    manifest = group.attrs.get(MANIFEST_KEY)
    if not isinstance(manifest, dict):
        raise InterruptedLayout(f"{path} is a Zarr group without a kdcache manifest: a precompute that was "
                                "interrupted before it wrote one (rerun it to rebuild), or not a kdcache cache")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"cache {path} has format_version {version}, this kdcache reads up to {FORMAT_VERSION} — "
            "upgrade kdcache"
        )
    cache = Cache(path, group, dict(manifest))
    if not allow_incomplete and not cache.complete:
        done = int(cache.shards_done().sum())
        raise CacheCorrupt(
            f"cache {path} is incomplete ({done}/{cache.num_shards} shards written) — "
            "rerun the same precompute command to finish it"
        )
    return cache
