"""Per-view arrays: their specs, codecs and chunk shapes, how they are created, and how a spec is
written to and read from the manifest's ``layout.arrays`` entries.

Chunks are ``[S, 1, ...]`` along the sample and view axes, so an epoch that reads one view per block
of S samples decodes each stored byte once (docs/format.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from kdcache.errors import InvalidSpec

MAX_CHUNK_FILES = 10_000  # per array; above it the layout switches to Zarr sharding
CHUNK_BYTES = 1 << 20  # target bytes of a chunk of the largest per-view array (uncompressed)
MAX_CHUNK_SAMPLES = 1024

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


def layout_entry(spec: ArraySpec) -> dict[str, Any]:
    """The manifest's ``layout.arrays`` entry of ``spec``."""
    return {"name": spec.name, "tail": list(spec.tail), "dtype": spec.dtype, "logical_dtype": spec.logical or spec.dtype,
            "codec": f"{spec.codec}:{spec.level}"}


def spec_from_entry(entry: Mapping[str, Any], name: str | None = None) -> ArraySpec:
    """The :class:`ArraySpec` a ``layout.arrays`` entry describes (named ``name`` if given)."""
    codec, _, level = entry.get("codec", f"{DEFAULT_CODEC}:{DEFAULT_LEVEL}").rpartition(":")
    logical = entry.get("logical_dtype")
    return ArraySpec(name or entry["name"], tuple(entry["tail"]), entry["dtype"],
                     None if logical in (None, entry["dtype"]) else logical, codec, int(level))


def encoded_bytes(values: np.ndarray, spec: ArraySpec, chunk: int) -> int:
    """Bytes of ``values [n, 1, *tail]`` encoded in memory in chunks ``[chunk, 1, *tail]`` with the codecs of ``spec``."""
    objects: dict[str, Any] = {}
    store = zarr.storage.MemoryStore(objects)
    arr = zarr.create_array(store, shape=values.shape, chunks=(chunk, *values.shape[1:]), dtype=spec.dtype,
                            compressors=compressors(spec.dtype, spec.codec, spec.level), fill_value=0,
                            config={"write_empty_chunks": True})
    arr[:] = values
    return sum(len(value) for key, value in objects.items() if key.startswith("c/"))


def create_view_array(group: zarr.Group, spec: ArraySpec, num_samples: int, views: int, chunk: int,
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


def create_sample_array(group: zarr.Group, name: str, values: np.ndarray, chunk: int, shard: int,
                         sharded: bool) -> None:
    """A per-sample int64 array ``name [M]`` (labels, chosen sample ids) holding ``values``."""
    group.create_array(name, shape=values.shape, dtype="int64", chunks=(chunk,), shards=(shard,) if sharded else None,
                       compressors=compressors("int64"), fill_value=0,
                       config={"write_empty_chunks": True}, overwrite=True)[:] = np.asarray(values, dtype=np.int64)


def create_status_array(group: zarr.Group, name: str, num_shards: int) -> None:
    """Done flags ``name [num_shards]``, one uint8 chunk each, so writers of different shards never share one."""
    group.create_array(name, shape=(num_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=compressors("uint8"), overwrite=True)
