"""Reading other systems' pickle files without running them: ``torch.save`` archives (zip and legacy),
joblib's compressed files and plain pickles, through an unpickler that builds only plain data.

A pickle may name any importable callable and have it called while loading; that is how a malicious
file runs code. :class:`PlainUnpickler` resolves only the names in :data:`ALLOWED` — containers,
numbers, strings and NumPy arrays — and refuses every other one before it is imported, so nothing a
file names is ever called. Torch tensors (persistent storages) are refused too: ml-dr writes lists.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

from kdcache.errors import DataCorrupt, UnsafeFile

#: The only globals a file may name: plain containers, and what NumPy's own pickles of arrays,
#: dtypes and scalars name (``_codecs.encode`` rebuilds their bytes under protocol 2).
ALLOWED = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "slice"),
    ("builtins", "bytearray"), ("collections", "OrderedDict"), ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
})
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only (see :data:`ALLOWED`); ``name`` is used in its errors."""

    def __init__(self, stream: io.BufferedIOBase, name: str) -> None:
        super().__init__(stream)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # Python 2 names under protocols 0-2
        if module.split(".")[0] == "torch":
            self.persistent_load(None)
        if (module, name) not in ALLOWED:
            raise UnsafeFile(f"{self.name} asks to load {module}.{name}, which is not plain data — kdcache reads "
                             "only containers, numbers, strings and NumPy arrays from a pickle; nothing of it was run")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFile(f"{self.name} holds torch tensors — kdcache reads plain lists, numbers and NumPy arrays "
                         "from it (save them with .tolist())")


def load(path: str | Path) -> Any:
    """The object in ``path``: a ``torch.save`` file (zip or legacy), a joblib file (zlib, gzip, bz2, xz or
    uncompressed) or a plain pickle, built by :class:`PlainUnpickler`. DataCorrupt if it is not whole."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataCorrupt(f"{name} cannot be read ({exc.strerror or exc}) — check the path") from None
    try:
        return _load_bytes(data, name)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, OSError, lzma.LZMAError,
            ValueError, IndexError, TypeError, KeyError) as exc:
        raise DataCorrupt(f"{name} is not a whole pickle ({type(exc).__name__}: {exc}) — the file is truncated or "
                          "damaged; copy it again from its source") from None


def _load_bytes(data: bytes, name: str) -> Any:
    if data[:4] == b"PK\x03\x04":  # torch.save's zip archive: <name>/data.pkl holds the object
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if member is None:
                raise DataCorrupt(f"{name} is a zip archive without data.pkl — it is not a torch.save file")
            return _unpickle(archive.read(member), name)
    for magic, decompress in ((b"\x1f\x8b", gzip.decompress), (b"BZh", bz2.decompress),
                              (b"\xfd7zXZ", lzma.decompress), (b"\x78", zlib.decompress)):
        if data.startswith(magic):
            data = decompress(data)
            break
    stream = io.BytesIO(data)
    first = PlainUnpickler(stream, name).load()
    if first != _TORCH_LEGACY_MAGIC or isinstance(first, bool):
        return first
    for _ in range(2):  # the legacy torch.save: protocol version and system info precede the object
        PlainUnpickler(stream, name).load()
    return PlainUnpickler(stream, name).load()


def _unpickle(data: bytes, name: str) -> Any:
    return PlainUnpickler(io.BytesIO(data), name).load()


def dump_torch(obj: Any, path: str | Path) -> None:
    """Write ``obj`` (plain data) with ``torch.save`` at its default pickle protocol (2), whole or not at all
    (a temporary file renamed into place). ml-dr writes protocol 4, which torch >= 2.6's default
    ``torch.load(weights_only=True)`` refuses (FRAME); protocol 2 of plain data loads with it, so ml-dr's
    own reader reads the export under any torch."""
    import os

    import torch

    tmp = Path(f"{path}.{os.getpid()}.tmp")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)
