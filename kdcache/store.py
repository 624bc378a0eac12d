"""The cache: a Zarr v3 group holding teacher outputs per (sample, view), and its manifest.

Nothing outside this module touches Zarr or the storage behind it. Layout (docs/format.md is the
complete specification):

- ``labels [N]`` and, per stored output, an array ``[N, K, ...]`` chunked ``[S, 1, ...]`` along the
  sample and view axes, so that an epoch that reads one view per block of S samples decodes each
  stored byte once. With more than ``MAX_CHUNK_FILES`` chunks per array, chunks are packed into
  Zarr shards of exactly one writer shard (``[shard_samples, K, ...]``).
- ``status/shards [num_shards]``: one uint8 per shard, set to 1 only after every array of that
  shard is written. Each element is its own chunk, so writers of different shards never touch the
  same object.
- group attribute ``kdcache``: the JSON manifest. ``status`` becomes ``complete`` only after the
  last shard is marked done.

A cache lives at ``ROOT/<cache id>`` with an alias beside it (kdcache/roots.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import hashlib
import itertools
import json
import platform
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from kdcache.errors import CacheCorrupt, CacheMismatch, InvalidSpec, MissingData, UnsupportedFormat
from kdcache.roots import resolve, where_caches_are

FORMAT_VERSION = 1
MANIFEST_KEY = "kdcache"
STATUS_ARRAY = "status/shards"
MAX_CHUNK_FILES = 10_000  # per array; above it the layout switches to Zarr sharding
CHUNK_BYTES = 1 << 20  # target bytes of a chunk of the largest per-view array (uncompressed)
MAX_CHUNK_SAMPLES = 1024

#: Manifest sections whose canonical JSON defines a cache's identity.
IDENTITY_KEYS = ("teacher", "dataset", "recipe", "outputs")

#: The arrays holding the teacher target, per logit mode.
TARGET_ARRAYS = {
    "dense": ("logits",),
    "topk": ("topk/values", "topk/indices"),
    "sampled": ("sampled/ids", "sampled/counts"),
}

#: Compressors measured by benchmarks/storage.py; the defaults are chosen from those numbers
#: (docs/format.md): blosc-zstd 5 with shuffle is the smallest codec that still encodes at tens of
#: MB/s; full feature maps, thousands of bytes per view, take plain zstd 1: as small on them as
#: blosc-zstd 5 and about 6x faster to encode.
CODECS = ("blosc-zstd", "blosc-lz4", "zstd", "none")
DEFAULT_CODEC, DEFAULT_LEVEL = "blosc-zstd", 5
MAP_CODEC, MAP_LEVEL = "zstd", 1


@dataclass(frozen=True)
class ArraySpec:
    """One per-view array of the cache: ``name`` with shape ``[N, K, *tail]``.

    ``dtype`` is the Zarr data type; ``logical`` what the values mean when it differs
    (``bfloat16`` values are stored as their uint16 bit patterns); ``codec``/``level`` its compressor.
    """

    name: str
    tail: tuple[int, ...]
    dtype: str
    logical: str | None = None
    codec: str = DEFAULT_CODEC
    level: int = DEFAULT_LEVEL


def storage_dtype(dtype: str) -> str:
    """The Zarr dtype a logical dtype is stored as: bfloat16 as its uint16 bit pattern."""
    return "uint16" if dtype == "bfloat16" else dtype


def decode_logits(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored logits (any logical dtype) as float32."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    return values.astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def densify(spec: Mapping[str, Any], num_classes: int, block: Mapping[str, np.ndarray],
            temperature: float = 1.0) -> np.ndarray:
    """Dense teacher probabilities ``[..., C]`` float32 from the target arrays of one logit mode.

    - dense: ``softmax(z / T)``;
    - topk: the stored values are log-probabilities, so ``exp(v)`` are the exact top-k
      probabilities; the missing mass ``1 - Σ exp(v)`` is spread uniformly over the other classes;
    - sampled: ``counts / N``, the unbiased sparse estimate of the teacher distribution.

    For sparse modes ``T != 1`` tempers the densified distribution, ``p^(1/T)`` renormalised: exact
    on the stored classes' ratios, approximate on the tail (and no longer unbiased for sampled).
    """
    mode = spec["mode"]
    if mode == "dense":
        z = decode_logits(block["logits"], spec["dtype"]).astype(np.float64)
        return _softmax(z / temperature).astype(np.float32)
    if mode == "topk":
        p = np.exp(decode_logits(block["topk/values"], spec["dtype"]).astype(np.float64))
        k = p.shape[-1]
        rest = np.clip(1.0 - p.sum(axis=-1, keepdims=True), 0.0, None) / max(num_classes - k, 1)
        probs = np.repeat(rest, num_classes, axis=-1)
        np.put_along_axis(probs, block["topk/indices"].astype(np.int64), p, axis=-1)
    elif mode == "sampled":
        ids = block["sampled/ids"].astype(np.int64)
        probs = np.zeros((*ids.shape[:-1], num_classes + 1))  # the last column absorbs the -1 padding
        np.put_along_axis(probs, np.where(ids >= 0, ids, num_classes), block["sampled/counts"].astype(np.float64),
                          axis=-1)
        probs = probs[..., :num_classes]
    else:
        raise UnsupportedFormat(f"logit mode {mode!r} is unknown to this kdcache — upgrade kdcache")
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def cache_id(manifest: Mapping[str, Any]) -> str:
    """Content id of a cache: a hash of what determines its contents, nothing else."""
    identity = json.loads(canonical_json({key: manifest[key] for key in IDENTITY_KEYS}))
    for member in identity["teacher"]["members"]:
        member.pop("weights", None)  # where the weights file lay does not change the outputs
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def provenance() -> dict[str, str]:
    """Versions, host and time of the run that writes a cache."""
    import numcodecs
    import torch

    from kdcache import __version__

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {
        "kdcache": __version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "user": user,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---- opening storage: local paths and fsspec URLs alike --------------------------------------
def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _open_store(path: str, read_only: bool) -> zarr.abc.store.Store:
    if _is_url(path):
        return zarr.storage.FsspecStore.from_url(path, read_only=read_only)
    local = path.removeprefix("file://")
    return zarr.storage.LocalStore(local, read_only=read_only)


def _exists(path: str) -> bool:
    try:
        zarr.open_group(_open_store(path, read_only=True), mode="r")
        return True
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False


def _manifest_at(path: str) -> dict[str, Any] | None:
    try:
        group = zarr.open_group(_open_store(path, read_only=True), mode="r")
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return None
    manifest = group.attrs.get(MANIFEST_KEY)
    return manifest if isinstance(manifest, dict) else None


def cache_exists(path: str) -> bool:
    """Whether ``path`` holds any Zarr group (complete or not)."""
    return _exists(str(path))


# ---- codecs and layout ---------------------------------------------------------------------
def compressors(dtype: str, codec: str = DEFAULT_CODEC, level: int = DEFAULT_LEVEL) -> list:
    """The bytes-to-bytes codecs of an array: a compressor, then the crc32c checksum of each chunk."""
    # Byte shuffle groups the high bytes of numbers together, which is where their redundancy lies.
    shuffle = "shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle"
    if codec == "blosc-zstd":
        first = [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle)]
    elif codec == "blosc-lz4":
        first = [BloscCodec(cname="lz4", clevel=level, shuffle=shuffle)]
    elif codec == "zstd":
        first = [ZstdCodec(level=level)]
    elif codec == "none":
        first = []
    else:
        raise InvalidSpec(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    return [*first, Crc32cCodec()]


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


def default_chunk_samples(specs: Iterable[ArraySpec]) -> int:
    """Samples per chunk: about 1 MiB of the largest per-view array, a power of two in [64, 1024].

    Large enough that Zarr's fixed cost per chunk read is small beside decoding it (benchmarks/
    cache_read.py); at most 1024 samples because training shuffles within a window of a few chunks.
    """
    largest = max(
        (int(np.prod(s.tail, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in specs),
        default=1,
    )
    target = max(1, CHUNK_BYTES // max(largest, 1))
    return int(min(MAX_CHUNK_SAMPLES, max(64, 2 ** int(np.floor(np.log2(target))))))


class Cache:
    """An open cache: its manifest and typed, block-wise access to what it stores."""

    def __init__(self, path: str, group: zarr.Group, manifest: dict[str, Any]):
        self.path = path
        self.group = group
        self.manifest = manifest
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """Array ``name``, opened once: opening reads its metadata object, a storage round trip."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr

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
        return np.asarray(self._array("labels")[:], dtype=np.int64)

    def shards_done(self) -> np.ndarray:
        """Boolean [num_shards]: which shards are fully written."""
        return np.asarray(self._array(STATUS_ARRAY)[:], dtype=bool)

    def read_block(self, names: Iterable[str], start: int, stop: int, view: int) -> dict[str, np.ndarray]:
        """Arrays ``name[start:stop, view]``: one decode per chunk, the access pattern of training."""
        return self.read_blocks(list(names), [(start, stop, view)])[0]

    def read_blocks(self, names: Sequence[str], blocks: Sequence[tuple[int, int, int]]) -> list[dict[str, np.ndarray]]:
        """Arrays ``name[start:stop, view]`` for every ``(start, stop, view)`` of ``blocks``, in one round.

        Every (array, block) read is issued at once, so storage latency (S3 requests, disk seeks) and
        Zarr's per-call overhead are paid once per round rather than once per array and block.
        """
        from zarr.core.sync import sync

        arrays = [self._array(name).async_array for name in names]

        async def gather() -> list[Any]:
            return await asyncio.gather(*(arr.getitem((slice(start, stop), view))
                                          for start, stop, view in blocks for arr in arrays))

        flat = iter(sync(gather()))
        return [{name: np.asarray(next(flat)) for name in names} for _ in blocks]

    def has_array(self, name: str) -> bool:
        return name in self.group

    def read_array(self, name: str) -> np.ndarray:
        """The whole of array ``name`` (for small bookkeeping arrays such as ``he/indices``)."""
        return np.asarray(self._array(name)[...])

    def read_samples(self, name: str, start: int, stop: int) -> np.ndarray:
        """Array ``name[start:stop]`` with every view."""
        return np.asarray(self._array(name)[start:stop])

    def read_views(self, name: str, indices: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Array ``name`` at arbitrary (sample, view) pairs; slower than :meth:`read_block`."""
        samples, at_sample = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        picked, at_view = np.unique(np.asarray(views, dtype=np.int64), return_inverse=True)
        block = np.asarray(self._array(name).get_orthogonal_selection((samples, picked)))
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
        return np.asarray(self._array("energy")[:, :, self.energy_column(temperature)])

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
        from zarr.core.sync import sync

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

    def missing_chunks(self, name: str) -> list[str]:
        """Keys of chunk (or shard) objects of ``name`` that done shards should have but storage lacks."""
        from zarr.core.sync import sync

        arr = self.group[name]
        outer = arr.shards or arr.chunks
        prefix = f"{name}/c/"

        async def listing() -> set[str]:
            return {key async for key in self.group.store.list_prefix(prefix)}

        present = sync(listing())
        done = self.shards_done()
        missing = []
        for coords in itertools.product(*(range(-(-n // s)) for n, s in zip(arr.shape, outer))):
            if name != "labels" and not done[coords[0] * outer[0] // self.shard_samples]:
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
        for name in self.array_names:
            arr = self.group[name]
            arr.resize((arr.shape[0], views, *arr.shape[2:]))

    def add_array(self, spec: ArraySpec, views: int) -> None:
        """Create per-view array ``spec`` with ``views`` views, laid out like the others (not yet in the manifest)."""
        layout = self.manifest["layout"]
        self._arrays.pop(spec.name, None)
        _create_view_array(self.group, spec, self.num_samples, views, self.chunk_samples, self.shard_samples,
                           bool(layout.get("sharded")))

    def add_view_group(self, prefix: str, specs: Sequence[ArraySpec], indices: np.ndarray, views: int, chunk: int,
                       shard: int) -> None:
        """Per-view arrays ``prefix + name [M, views, ...]`` for the samples ``indices`` (kept as
        ``prefix + "indices"``), chunked ``[chunk, 1, ...]``, and ``prefix + "status"`` with one flag per
        ``shard`` rows: the layout of the energy-guided extra views (kdcache/heda.py)."""
        m = len(indices)
        for spec in specs:
            self._arrays.pop(prefix + spec.name, None)
            _create_view_array(self.group, dataclasses.replace(spec, name=prefix + spec.name), m, views, chunk,
                               shard, sharded=False)
        for name in ("indices", "status"):
            self._arrays.pop(prefix + name, None)
        _create_sample_array(self.group, prefix + "indices", np.asarray(indices), chunk, shard, sharded=False)
        _create_status_array(self.group, prefix + "status", -(-m // shard))

    def mark_done(self, status: str, shard: int) -> None:
        """Set flag ``shard`` of the status array ``status``: the last write of a shard."""
        self._array(status)[shard] = 1

    def write_views(self, name: str, start: int, first_view: int, values: np.ndarray) -> None:
        """Write ``values [n, k, ...]`` to samples ``start..start+n`` and views ``first_view..first_view+k``."""
        self._array(name)[start : start + values.shape[0], first_view : first_view + values.shape[1]] = values

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest: the last step of an extension."""
        self.manifest = manifest
        self.group.attrs[MANIFEST_KEY] = manifest


def _create_view_array(group: zarr.Group, spec: ArraySpec, num_samples: int, views: int, chunk: int,
                       shard_samples: int, sharded: bool) -> None:
    """A per-view array ``[N, K, *tail]`` in chunks ``[S, 1, *tail]`` (inside shards ``[H, K, *tail]``)."""
    group.create_array(
        spec.name,
        shape=(num_samples, views, *spec.tail),
        dtype=spec.dtype,
        chunks=(chunk, 1, *spec.tail),
        shards=(shard_samples, views, *spec.tail) if sharded else None,
        compressors=compressors(spec.dtype, spec.codec, spec.level),
        fill_value=0,
        config={"write_empty_chunks": True},  # so a missing chunk file is always damage, never zeros
        overwrite=True,
    )


def _create_sample_array(group: zarr.Group, name: str, values: np.ndarray, chunk: int, shard: int,
                         sharded: bool) -> None:
    """A per-sample int64 array ``name [M]`` (labels, chosen sample ids) holding ``values``."""
    group.create_array(name, shape=values.shape, dtype="int64", chunks=(chunk,), shards=(shard,) if sharded else None,
                       compressors=compressors("int64"), fill_value=0,
                       config={"write_empty_chunks": True}, overwrite=True)[:] = np.asarray(values, dtype=np.int64)


def _create_status_array(group: zarr.Group, name: str, num_shards: int) -> None:
    """Done flags ``name [num_shards]``, one uint8 chunk each, so writers of different shards never share one."""
    group.create_array(name, shape=(num_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=compressors("uint8"), overwrite=True)


def create_cache(
    path: str,
    manifest: dict[str, Any],
    labels: np.ndarray,
    specs: list[ArraySpec],
    chunk_samples: int | None = None,
    shard_chunks: int = 4,
    sharded: bool | None = None,
) -> Cache:
    """Lay out a new cache at ``path`` with status ``writing``; refuses to overwrite a cache.

    The manifest is written last, so a Zarr group at ``path`` without one is a layout whose creation
    was interrupted: it is rebuilt array by array (the folder itself is kept, and with it a writer's
    lock file). ``sharded=None`` packs chunks into Zarr shards when an array would otherwise have
    more than ``MAX_CHUNK_FILES`` chunk files.
    """
    if _manifest_at(path) is not None:
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
        "arrays": [{"name": s.name, "tail": list(s.tail), "dtype": s.dtype, "logical_dtype": s.logical or s.dtype,
                    "codec": f"{s.codec}:{s.level}"} for s in specs],
    }
    manifest["cache_id"] = cache_id(manifest)

    group = zarr.open_group(_open_store(path, read_only=False), mode="a", zarr_format=3)
    _create_sample_array(group, "labels", np.asarray(labels), chunk, shard_samples, sharded)
    for spec in specs:
        _create_view_array(group, spec, num_samples, views, chunk, shard_samples, sharded)
    _create_status_array(group, STATUS_ARRAY, num_shards)
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
        group = zarr.open_group(_open_store(path, read_only=mode == "r"), mode=mode)
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as exc:
        raise MissingData(f"no cache at {path} — {where_caches_are(path)}") from exc
    manifest = group.attrs.get(MANIFEST_KEY)
    if not isinstance(manifest, dict):
        raise CacheCorrupt(f"{path} is a Zarr group but not a kdcache cache (no '{MANIFEST_KEY}' manifest)")
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
