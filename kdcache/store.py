"""The cache: a Zarr v3 group holding teacher outputs per (sample, view), and its manifest.

Nothing outside this module touches Zarr. Layout (see docs/format.md):

- ``labels [N]`` and, per stored output, an array ``[N, K, ...]`` chunked ``[S, 1, ...]`` along the
  sample and view axes, so that an epoch that reads one view per block of S samples decodes each
  stored byte once.
- ``status/shards [num_shards]``: one uint8 per shard, set to 1 only after every array of that
  shard is written. Each element is its own chunk, so writers of different shards never touch the
  same object.
- group attribute ``kdcache``: the JSON manifest. ``status`` becomes ``complete`` only after the
  last shard is marked done.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec

from kdcache.errors import CacheCorrupt, CacheMismatch, MissingData, UnsupportedFormat

FORMAT_VERSION = 1
MANIFEST_KEY = "kdcache"
STATUS_ARRAY = "status/shards"

#: Manifest sections whose canonical JSON defines a cache's identity.
IDENTITY_KEYS = ("teacher", "dataset", "recipe", "outputs")


@dataclass(frozen=True)
class ArraySpec:
    """One per-view array of the cache: ``name`` with shape ``[N, K, *tail]``."""

    name: str
    tail: tuple[int, ...]
    dtype: str


def storage_dtype(dtype: str) -> str:
    """The Zarr dtype a logical dtype is stored as: bfloat16 as its uint16 bit pattern."""
    return "uint16" if dtype == "bfloat16" else dtype


def decode_logits(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored logits (any logical dtype) as float32."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float().numpy()
    return values.astype(np.float32)


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
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False


def _compressors(dtype: str) -> list:
    # Byte shuffle groups the high bytes of floats together, which is where their redundancy lies.
    shuffle = "shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle"
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]


def default_chunk_samples(specs: Iterable[ArraySpec]) -> int:
    """Samples per chunk: about 256 KiB of the largest per-view array, a power of two in [64, 8192]."""
    largest = max(
        (int(np.prod(s.tail, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in specs),
        default=1,
    )
    target = max(1, (256 * 1024) // max(largest, 1))
    return int(min(8192, max(64, 2 ** int(np.floor(np.log2(target))))))


class Cache:
    """An open cache: its manifest and typed, block-wise access to what it stores."""

    def __init__(self, path: str, group: zarr.Group, manifest: dict[str, Any]):
        self.path = path
        self.group = group
        self.manifest = manifest

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

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_samples
        return start, min(start + self.shard_samples, self.num_samples)

    # ---- reading ------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        return np.asarray(self.group["labels"][:], dtype=np.int64)

    def shards_done(self) -> np.ndarray:
        """Boolean [num_shards]: which shards are fully written."""
        return np.asarray(self.group[STATUS_ARRAY][:], dtype=bool)

    def read_block(self, names: Iterable[str], start: int, stop: int, view: int) -> dict[str, np.ndarray]:
        """Arrays ``name[start:stop, view]``: one decode per chunk, the access pattern of training."""
        return {name: self.group[name][start:stop, view] for name in names}

    def read_views(self, name: str, indices: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Array ``name`` at arbitrary (sample, view) pairs; slower than :meth:`read_block`."""
        samples, at_sample = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        picked, at_view = np.unique(np.asarray(views, dtype=np.int64), return_inverse=True)
        block = np.asarray(self.group[name].get_orthogonal_selection((samples, picked)))
        return block[at_sample.reshape(-1), at_view.reshape(-1)]

    def logits(self, indices: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Dense teacher logits [B, C] as float32 for the given (sample, view) pairs."""
        if "logits" not in self.array_names:
            raise CacheMismatch(f"cache {self.path} stores no dense logits — re-run precompute with --logits dense")
        return decode_logits(self.read_views("logits", indices, views), self.logit_dtype)

    @property
    def logit_dtype(self) -> str:
        return self.manifest["outputs"]["logits"]["dtype"]

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
        return np.asarray(self.group["energy"][:, :, self.energy_column(temperature)])

    def aug_params(self, indices: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Augmentation params of the given (sample, view) pairs, field -> [B, *tail]."""
        return {
            name.removeprefix("aug/"): self.read_views(name, indices, views)
            for name in self.array_names
            if name.startswith("aug/")
        }

    # ---- writing ------------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every per-view array of ``shard`` and then, only then, mark it done."""
        start, stop = self.shard_range(shard)
        missing = set(self.array_names) - set(arrays)
        if missing:
            raise ValueError(f"write_shard({shard}) lacks arrays {sorted(missing)}")
        for name in self.array_names:
            self.group[name][start:stop] = arrays[name]
        self.group[STATUS_ARRAY][shard] = 1

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


def create_cache(
    path: str,
    manifest: dict[str, Any],
    labels: np.ndarray,
    specs: list[ArraySpec],
    chunk_samples: int | None = None,
    shard_chunks: int = 4,
) -> Cache:
    """Lay out a new cache at ``path`` with status ``writing``; refuses to overwrite anything."""
    if _exists(path):
        raise CacheMismatch(f"{path} already holds a cache — choose another --out or delete it")
    num_samples = int(manifest["dataset"]["num_samples"])
    views = int(manifest["recipe"]["views"])
    chunk = chunk_samples or default_chunk_samples(specs)
    chunk = min(chunk, max(num_samples, 1))
    shard_samples = chunk * shard_chunks
    num_shards = -(-num_samples // shard_samples)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["status"] = "writing"
    manifest["layout"] = {
        "chunk_samples": chunk,
        "shard_samples": shard_samples,
        "num_shards": num_shards,
        "arrays": [{"name": s.name, "tail": list(s.tail), "dtype": s.dtype} for s in specs],
    }
    manifest["cache_id"] = cache_id(manifest)

    group = zarr.open_group(_open_store(path, read_only=False), mode="w-", zarr_format=3)
    group.create_array(
        "labels", data=np.asarray(labels, dtype=np.int64), chunks=(chunk,),
        compressors=_compressors("int64"),
    )
    for spec in specs:
        group.create_array(
            spec.name,
            shape=(num_samples, views, *spec.tail),
            dtype=spec.dtype,
            chunks=(chunk, 1, *spec.tail),
            compressors=_compressors(spec.dtype),
            fill_value=0,
        )
    group.create_array(STATUS_ARRAY, shape=(num_shards,), dtype="uint8", chunks=(1,), fill_value=0)
    group.attrs[MANIFEST_KEY] = manifest
    return Cache(path, group, manifest)


def open_cache(path: str, mode: str = "r", allow_incomplete: bool = False) -> Cache:
    """Open a cache for reading (``"r"``) or for resuming a write (``"r+"``).

    Refuses a cache of a newer format, a folder that is not a kdcache cache and, unless
    ``allow_incomplete``, a cache whose writer has not finished.
    """
    path = str(path)
    try:
        group = zarr.open_group(_open_store(path, read_only=mode == "r"), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as exc:
        raise MissingData(f"no cache at {path} — run `kdcache precompute --out {path}` first") from exc
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


def cache_exists(path: str) -> bool:
    """Whether ``path`` holds any Zarr group (complete or not)."""
    return _exists(str(path))
