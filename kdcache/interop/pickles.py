"""Reading other systems' pickle files without running them: ``torch.save`` archives (zip and legacy),
joblib's compressed files and plain pickles, through an unpickler that builds only plain data.

A pickle may name any importable callable and have it called while loading; that is how a malicious
file runs code. :class:`PlainUnpickler` resolves only the names in :data:`ALLOWED` — containers,
numbers, strings and NumPy arrays — and refuses every other one before it is imported, so nothing a
file names is ever called. Torch tensors (persistent storages) are refused too: ml-dr writes lists.

A file of plain data can still ask for more memory than the machine has. So every read is bounded, far
above any real source's needs (an ml-dr sample file is a few KB; docs/interop.md lists the limits): the file's
size (:data:`MAX_FILE_BYTES`), its decompressed size (:data:`MAX_DECOMPRESSED`), the lengths its opcodes
declare, their count (:data:`MAX_OPCODES`) and nesting (:data:`MAX_DEPTH`), the elements of an array or
``bytearray`` (:data:`MAX_ELEMENTS`), and the items of the object once built, counted as a consumer that
walks it would visit them, shared parts as often as they are shared (:data:`MAX_ITEMS`).
"""

from __future__ import annotations

import bz2
import io
import lzma
import math
import pickle
import pickletools
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import DataCorrupt, UnsafeFile
from kdcache.locations import guard

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

MAX_FILE_BYTES = 1 << 30  # one file as stored
MAX_DECOMPRESSED = 1 << 30  # a joblib file inflated, or a torch.save archive's data.pkl
MAX_OPCODES = 50_000_000  # pickle opcodes in one object
MAX_DEPTH = 100  # nesting of containers
MAX_ELEMENTS = 1 << 28  # elements of one NumPy array or bytes of one bytearray
MAX_ITEMS = 50_000_000  # items of the built object, shared parts counted each time they are reached


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
        if name == "bytearray":
            return self._bytearray
        if name == "_reconstruct":
            return _reconstruct
        return super().find_class(module, name)

    def _bytearray(self, *args: Any) -> bytearray:
        if args and isinstance(args[0], int) and args[0] > MAX_ELEMENTS:
            raise DataCorrupt(f"{self.name} asks for a bytearray of {args[0]:,} bytes, more than {MAX_ELEMENTS:,} "
                              "(MAX_ELEMENTS) — it is not a real source file")
        return bytearray(*args)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFile(f"{self.name} holds torch tensors — kdcache reads plain lists, numbers and NumPy arrays "
                         "from it (save them with .tolist())")


class _CheckedArray(np.ndarray):
    """What ``numpy._reconstruct`` builds here: an array whose state is checked for its size before NumPy
    allocates it (an object array of 1e11 items is a few bytes of pickle)."""

    def __setstate__(self, state: Any) -> None:
        shape = state[1] if isinstance(state, tuple) and len(state) >= 2 else ()
        try:
            count = math.prod(int(n) for n in shape)
        except (TypeError, ValueError):
            count = -1
        if not 0 <= count <= MAX_ELEMENTS:
            raise DataCorrupt(f"a NumPy array of shape {shape!r} in the file has more than {MAX_ELEMENTS:,} elements "
                              "(MAX_ELEMENTS) — it is not a real source file")
        super().__setstate__(state)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    return np.ndarray.__new__(_CheckedArray, (0,), dtype)


def load(path: str | Path) -> Any:
    """The object in ``path``: a ``torch.save`` file (zip or legacy), a joblib file (zlib, gzip, bz2, xz or
    uncompressed) or a plain pickle, built by :class:`PlainUnpickler` within the module's limits. DataCorrupt if
    it is not whole, or asks for more than a limit."""
    name = str(path)
    guard(path, "pickle")
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise DataCorrupt(f"{name} holds {size:,} bytes, more than {MAX_FILE_BYTES:,} (MAX_FILE_BYTES) — it is not "
                              "one sample's file")
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataCorrupt(f"{name} cannot be read ({exc.strerror or exc}) — check the path") from None
    try:
        return _plain(_load_bytes(data, name), name)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, OSError, lzma.LZMAError,
            ValueError, IndexError, TypeError, KeyError, AttributeError, RecursionError, MemoryError) as exc:
        raise DataCorrupt(f"{name} is not a whole pickle ({type(exc).__name__}: {exc}) — the file is truncated or "
                          "damaged; copy it again from its source") from None


def _plain(obj: Any, name: str) -> Any:
    """``obj`` with checked arrays as plain ones, once its items, counted as a walk reaches them, are within
    :data:`MAX_ITEMS` and its nesting within :data:`MAX_DEPTH`."""
    seen = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_ITEMS or depth > MAX_DEPTH:
            what = f"more than {MAX_ITEMS:,} items (MAX_ITEMS)" if seen > MAX_ITEMS else \
                f"containers nested deeper than {MAX_DEPTH} (MAX_DEPTH)"
            raise DataCorrupt(f"{name} holds {what} — it is not a real source file")
        if isinstance(item, dict):
            stack += [(v, depth + 1) for pair in item.items() for v in pair]
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack += [(v, depth + 1) for v in item]
    return _unchecked(obj)


def _unchecked(obj: Any) -> Any:
    """``obj`` with every :class:`_CheckedArray` viewed as a plain ``ndarray``."""
    if isinstance(obj, _CheckedArray):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        return type(obj)((k, _unchecked(v)) for k, v in obj.items()) if any(
            isinstance(v, (_CheckedArray, dict, list, tuple)) for v in obj.values()) else obj
    if isinstance(obj, (list, tuple)):
        if not any(isinstance(v, (_CheckedArray, dict, list, tuple)) for v in obj):
            return obj
        return type(obj)(_unchecked(v) for v in obj)
    return obj


def _bounded(decompress: Any, data: bytes, name: str) -> bytes:
    """``data`` decompressed by the streaming decompressor ``decompress``, refused beyond :data:`MAX_DECOMPRESSED`."""
    out = decompress.decompress(data, MAX_DECOMPRESSED + 1)
    if len(out) > MAX_DECOMPRESSED:
        raise DataCorrupt(f"{name} inflates to more than {MAX_DECOMPRESSED:,} bytes (MAX_DECOMPRESSED) — it is not "
                          "one sample's file")
    return out


def _scan(data: bytes, name: str) -> None:
    """Check a pickle's opcodes before anything is built: the lengths they declare are the bytes there, and
    their count and nesting are within :data:`MAX_OPCODES` and :data:`MAX_DEPTH`."""
    depth = 0
    for count, (op, _, _) in enumerate(pickletools.genops(data)):
        if count > MAX_OPCODES:
            raise DataCorrupt(f"{name} holds more than {MAX_OPCODES:,} pickle opcodes (MAX_OPCODES) — it is not a real "
                              "source file")
        if op.name == "MARK":
            depth += 1
            if depth > MAX_DEPTH:
                raise DataCorrupt(f"{name} nests containers deeper than {MAX_DEPTH} (MAX_DEPTH) — it is not a real "
                                  "source file")
        elif op.name in _POPS_MARK:
            depth -= 1
        if op.name == "STOP":
            return


_POPS_MARK = frozenset({"TUPLE", "LIST", "DICT", "APPENDS", "SETITEMS", "FROZENSET", "ADDITEMS", "OBJ", "INST",
                        "POP_MARK"})  # the opcodes that close what a MARK opened


def _load_bytes(data: bytes, name: str) -> Any:
    if data[:4] == b"PK\x03\x04":  # torch.save's zip archive: <name>/data.pkl holds the object
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            member = next((m for m in archive.infolist() if m.filename.endswith("data.pkl")), None)
            if member is None:
                raise DataCorrupt(f"{name} is a zip archive without data.pkl — it is not a torch.save file")
            if member.file_size > MAX_DECOMPRESSED:
                raise DataCorrupt(f"{name}'s data.pkl declares {member.file_size:,} bytes, more than "
                                  f"{MAX_DECOMPRESSED:,} (MAX_DECOMPRESSED) — it is not one sample's file")
            return _unpickle(archive.read(member), name)
    for magic, decompressor in ((b"\x1f\x8b", lambda: zlib.decompressobj(31)), (b"BZh", bz2.BZ2Decompressor),
                                (b"\xfd7zXZ", lzma.LZMADecompressor), (b"\x78", zlib.decompressobj)):
        if data.startswith(magic):
            data = _bounded(decompressor(), data, name)
            break
    stream = io.BytesIO(data)
    first = _unpickle_from(stream, name)
    if first != _TORCH_LEGACY_MAGIC or isinstance(first, bool):
        return first
    for _ in range(2):  # the legacy torch.save: protocol version and system info precede the object
        _unpickle_from(stream, name)
    return _unpickle_from(stream, name)


def _unpickle_from(stream: io.BytesIO, name: str) -> Any:
    """The next pickle of ``stream``, scanned (:func:`_scan`) before it is built."""
    start = stream.tell()
    _scan(stream.getbuffer()[start:].tobytes(), name)
    stream.seek(start)
    return PlainUnpickler(stream, name).load()


def _unpickle(data: bytes, name: str) -> Any:
    return _unpickle_from(io.BytesIO(data), name)


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
