"""What binds a cache to its place and to its inputs (format 5).

- **Chunks bound to their place.** Zarr's crc32c codec proves that a chunk object is whole, not that it lies
  where it should: two chunks swapped between views or positions both pass it. So each per-view array
  ``name`` has ``digests/<name> [chunk rows, views]``: the crc32c of the decoded values of every chunk (rows
  ``r·S .. (r+1)·S`` of one view), written with the chunk. Block reads (the student's loader) and ``verify``
  compare, so a chunk moved to another position, view or array is named as such.
- **Inputs bound.** ``inputs/crc32c [N]`` holds the crc32c of the bytes each source image was decoded from
  when the teacher saw it; every reader that decodes an image checks it (kdcache/data/images.py).

Caches made before format 5 have neither; ``info`` says so, and reads check what there is.
"""

from __future__ import annotations

import numpy as np
import zarr

from kdcache.cache.arrays import compressors
from kdcache.checksums import crc32c

DIGESTS = "digests/"
INPUTS = "inputs/crc32c"


def digest_name(name: str) -> str:
    return DIGESTS + name


def create_digest_array(group: zarr.Group, name: str, rows: int, views: int, chunk: int, shard: int) -> None:
    """``digests/<name>`` for a per-view array of ``rows`` rows in chunks of ``chunk``: one uint32 per chunk and
    view, chunked one writer shard (``shard`` rows) at a time, so writers of different shards never share one."""
    per_shard = max(1, shard // chunk)
    group.create_array(digest_name(name), shape=(-(-rows // chunk), views), dtype="uint32", chunks=(per_shard, views),
                       compressors=compressors("uint32"), fill_value=0, config={"write_empty_chunks": True},
                       overwrite=True)


def create_inputs_array(group: zarr.Group, rows: int, chunk: int, shard: int) -> None:
    """``inputs/crc32c [rows]``, chunked like the samples."""
    group.create_array(INPUTS, shape=(rows,), dtype="uint32", chunks=(chunk,), shards=None,
                       compressors=compressors("uint32"), fill_value=0, config={"write_empty_chunks": True},
                       overwrite=True)
    del shard  # the inputs of a shard are one chunk-aligned slice, written with the shard


def chunk_digests(values: np.ndarray, chunk: int) -> np.ndarray:
    """uint32 ``[ceil(rows/chunk), views]``: the crc32c of every chunk of ``values [rows, views, ...]``."""
    rows, views = values.shape[:2]
    out = np.empty((-(-rows // chunk), views), dtype=np.uint32)
    for r, start in enumerate(range(0, rows, chunk)):
        for v in range(views):
            out[r, v] = crc32c(values[start : start + chunk, v])
    return out


def shard_inputs(values: np.ndarray) -> np.ndarray:
    """The per-sample crc32c of a shard from the per-view values the teacher pass recorded ``[rows, views]``;
    ValueError when two views of one sample read different bytes (the image changed during the run)."""
    values = np.asarray(values, dtype=np.uint32).reshape(len(values), -1)
    if (values != values[:, :1]).any():
        row = int(np.argwhere((values != values[:, :1]).any(axis=1))[0, 0])
        raise ValueError(f"row {row} of the shard: the views read different bytes of one image")
    return values[:, 0]
