"""Reading a cache: what its manifest describes and typed, block-wise reads of what it stores.

:class:`CacheReader` is the read side of :class:`kdcache.cache.store.Cache`. Every data read checks the
chunks it touches against one listing per array (kdcache/cache/chunks.py), so a missing chunk is one
CacheCorrupt line instead of zeros, and a chunk that fails its checksum is named.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import zarr

from kdcache.cache.arrays import ArraySpec, spec_from_entry
from kdcache.cache.chunks import REPAIR, ChunkIndex, damaged_error, missing_error
from kdcache.cache.digests import INPUTS, digest_name
from kdcache.cache.logits import TARGET_ARRAYS, decode_logits, densify
from kdcache.cache.manifest import check_dataset
from kdcache.cache.storage import run
from kdcache.checksums import crc32c
from kdcache.errors import CacheCorrupt, CacheMismatch, KdcacheError


def expected_layout(rows_array: str, rows: int, views: int,
                    specs: Sequence[ArraySpec]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (shape, Zarr dtype, logical dtype): the int64 per-row array and the per-view ``specs``."""
    out = {rows_array: ((rows,), "int64", "int64")}
    for spec in specs:
        out[spec.name] = ((rows, views, *spec.tail), spec.dtype, spec.logical or spec.dtype)
    return out


class CacheReader:
    """An open cache's manifest (in today's form, kdcache/cache/formats.py) and its reads."""

    def __init__(self, path: str, group: zarr.Group, manifest: dict[str, Any], stored_format: int | None = None):
        self.path = path
        self.group = group
        self.manifest = manifest
        #: The format version the manifest was written in; ``manifest`` is always in today's form.
        self.stored_format = int(manifest["format_version"]) if stored_format is None else stored_format
        self._arrays: dict[str, zarr.Array] = {}
        self._index: dict[str, ChunkIndex] = {}
        self._digests: dict[str, np.ndarray] = {}
        #: Every data read refuses chunks whose objects are missing (kdcache/cache/chunks.py); ``verify``,
        #: which reports them itself, turns this off. Format-1 caches may lack chunks that equal the fill
        #: value, so for them a missing object is not damage until ``kdcache upgrade`` has listed them.
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

    @property
    def id(self) -> str:
        return self.manifest["cache_id"]

    @property
    def binds_chunks(self) -> bool:
        """Whether every chunk's digest is kept, binding it to its array, rows and view (format 5 on)."""
        return bool(self.manifest.get("layout", {}).get("bound"))

    @property
    def binds_inputs(self) -> bool:
        """Whether the crc32c of every source image the teacher read is kept (precompute, format 5 on)."""
        return self.manifest.get("layout", {}).get("inputs") == "crc32c"

    def input_checksums(self) -> np.ndarray | None:
        """uint32 [N]: the crc32c of each train image's bytes as the teacher read them; None when not bound."""
        if not self.binds_inputs:
            return None
        self._present(INPUTS, slice(0, self.num_samples))
        return self._decoded(INPUTS, "", lambda: self._array(INPUTS)[:]).astype(np.uint32)

    def digests(self, name: str) -> np.ndarray | None:
        """uint32 [chunk rows, views]: the digest of every chunk of per-view array ``name``; None when the cache
        keeps none."""
        if not self.binds_chunks:
            return None
        table = self._digests.get(name)
        if table is None:
            key = digest_name(name)
            table = self._digests[name] = self._decoded(key, "", lambda: self._array(key)[:]).astype(np.uint32)
        return table

    def _check_digests(self, names: Sequence[str], blocks: Sequence[tuple[int, int, int]],
                       read: list[dict[str, np.ndarray]]) -> None:
        """Refuse a block whose values are not those its place held when written (a chunk moved to another
        position, view or array): the block reads of training, one whole chunk each."""
        if not self.binds_chunks:
            return
        for name in names:
            chunk, rows = self._array(name).chunks[0], self._array(name).shape[0]
            table = self.digests(name)
            for (start, stop, view), values in zip(blocks, read):
                if start % chunk or stop != min(start + chunk, rows) or view >= table.shape[1]:
                    continue
                if crc32c(values[name]) != int(table[start // chunk, view]):
                    raise CacheCorrupt(f"cache {self.path}: chunk {self.chunk_key(name, start, view)} of {name} holds "
                                       "values that are not the ones written there (moved from another position, view "
                                       "or array, or changed) — " + REPAIR.format(path=self.path))

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
        return expected_layout("labels", self.num_samples, self.views, self.array_specs())

    def expected_extra_arrays(self) -> dict[str, tuple[tuple[int, ...], str, str]]:
        """The same for the extra views (``he/indices`` and ``he/<array>``); empty without them."""
        he = self.manifest.get("he")
        if not he:
            return {}
        specs = [spec_from_entry(e) for e in he["arrays"]]
        return expected_layout("he/indices", int(he["samples"]), int(he["views"]), specs)

    def check_dataset(self, spec: str, fingerprint: str, num_classes: int, num_samples: int,
                      parts: Sequence[Mapping[str, Any]] = ()) -> None:
        """Refuse a dataset other than the one this cache was made from (CacheMismatch, one line naming
        the shard that differs when the source is sharded)."""
        check_dataset(self.manifest, self.path, spec, fingerprint, num_classes, num_samples, parts)

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

    def labels(self) -> np.ndarray:
        self._present("labels", slice(0, self.num_samples))
        return self._decoded("labels", "", lambda: self._array("labels")[:]).astype(np.int64)

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
        read = [{name: np.asarray(next(flat)) for name in names} for _ in blocks]
        self._check_digests(names, blocks, read)
        return read

    def _gathered(self, names: Sequence[str], blocks: Sequence[tuple[int, int, int]],
                  gather: Callable[[], Any]) -> list[Any]:
        """The reads of :meth:`read_blocks`; a read that fails is repeated block by block to name the chunk."""
        try:
            return run(gather())
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

    def read_samples(self, name: str, start: int, stop: int, bound: bool = False) -> np.ndarray:
        """Array ``name[start:stop]`` with every view; ``bound``: CacheCorrupt where a whole chunk read is not the
        one written at its place (as :meth:`read_blocks` checks; ``verify`` reports them instead)."""
        self._present(name, slice(start, stop))
        values = self._decoded(name, f"samples {start}..{stop - 1}", lambda: self._array(name)[start:stop])
        if bound and values.ndim >= 2:
            chunk, rows = self._array(name).chunks[0], self._array(name).shape[0]
            blocks = [(a, min(a + chunk, rows), v) for a in range(-(-start // chunk) * chunk, stop, chunk)
                      if min(a + chunk, rows) <= stop for v in range(values.shape[1])]
            self._check_digests([name], blocks, [{name: values[a - start : b - start, v]} for a, b, v in blocks])
        return values

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
