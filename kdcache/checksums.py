"""crc32c, the one checksum kdcache records of its own: of each source image's bytes (the teacher's inputs,
bound to the cache) and of each chunk's decoded values (bound to the array, rows and view it belongs to).
It is the checksum Zarr's chunk codec uses, from the same library (google-crc32c, through numcodecs)."""

from __future__ import annotations

import numpy as np
from numcodecs.checksum32 import CRC32C


def crc32c(data: bytes | bytearray | np.ndarray) -> int:
    """The crc32c of ``data``'s bytes (an array's in C order)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    elif not isinstance(data, bytes):
        data = bytes(data)
    return int(CRC32C.checksum(data))
