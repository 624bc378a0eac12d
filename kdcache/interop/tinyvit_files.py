"""TinyViT's saved-logits files: the epoch folders, each rank's keys and fixed-size items, and which entry of a
key kdcache reads (microsoft/Cream 4a13c40, TinyViT/data/augmentation/manager.py, dataset_wrapper.py)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdcache.data.images import Source
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.interop.tinyvit_pairs import Pairing, pairing, sampler_rows
from kdcache.locations import file_size, guard

_EPOCH = re.compile(r"logits_top([0-9]+)_epoch([0-9]+)$")
#: The most bytes of one rank's keys file: 60 M keys of ImageNet-22k's length, 4x its 14.2 M images.
MAX_KEYS_BYTES = 1 << 30


#: Where an epoch keeps each sample's item, as a position in its rank files laid end to end (uint32: an epoch
#: holds far fewer than 2**32 items), and with pair2 mixing the sample's mate (a kdcache index) and the mate's item.
ENTRY = np.dtype([("at", "<u4")])
PAIRED_ENTRY = np.dtype([("at", "<u4"), ("mate", "<i4"), ("mate_at", "<u4")])


def item_dtype(k: int) -> np.dtype:
    """One saved item: the int32 augmentation seed, K int16 class ids and K float16 probabilities."""
    return np.dtype([("seed", "<i4"), ("ids", "<i2", (k,)), ("probs", "<f2", (k,))])


class Epoch:
    """One ``logits_top<K>_epoch<E>`` folder: its rank files' items (memory-mapped) and the TinyViT samples whose
    view cannot be replayed (``lost``: mixed with a padded copy whose seed in that row was not saved).

    Where each sample's item is (:meth:`entries`) is computed once and handed to :class:`Spill`, so that an import
    of hundreds of epochs keeps no per-sample array of any epoch in memory.

    A key the sampler padded into several rank files has one whole (seed, logits) entry in each; TinyViT with as
    many ranks trains on each of them (a rank reads only its own file). kdcache keeps one view per (sample, epoch):
    the highest rank's entry, or with pair2 mixing the row ``tinyvit_pairs.pairing`` picks (docs/interop.md).
    """

    def __init__(self, folder: Path, k: int) -> None:
        self.item, self.folder = item_dtype(k), folder
        self.keys_files = rank_files(folder)
        self.values: list[np.ndarray] = []
        self.offsets = np.zeros(len(self.keys_files) + 1, np.int64)  # where each rank's items begin, end to end
        self.lost = np.zeros(0, np.int64)

    def entries(self, num_samples: int, resolve: Callable[[str, str], int], order: np.ndarray,
                paired: bool = False) -> np.ndarray:
        """Where each kdcache sample's item is (ENTRY or PAIRED_ENTRY, in kdcache order; ``order``: the kdcache index
        of each TinyViT sample); MissingData where a sample has none."""
        n = num_samples
        rank, row = np.full(n, -1, np.int32), np.zeros(n, np.int64)
        indices = []
        for slot, keys_file in enumerate(self.keys_files):
            keys = _keys(keys_file)
            self.values.append(self._values(keys_file, len(keys)))
            self.offsets[slot + 1] = self.offsets[slot] + len(keys)
            indices.append(np.array([resolve(key, str(keys_file)) for key in keys], dtype=np.int64))
            ids, first = np.unique(indices[-1], return_index=True)
            rank[ids], row[ids] = slot, first  # a padded key: the highest rank's entry, its first row there
        if (rank < 0).any():
            raise MissingData(f"{self.folder} has no logits of sample {int(np.argmax(rank < 0))} — the dataset has "
                              f"{n} samples; pass the --dataset the logits were saved for")
        out = np.empty(n, PAIRED_ENTRY if paired else ENTRY)
        if paired:
            mate, mate_row = self._pair(indices, n, rank, row)
            out["mate"][order] = order[mate]
            out["mate_at"][order] = self.offsets[rank] + mate_row
        out["at"][order] = self.offsets[rank] + row
        return out

    def _pair(self, indices: list[np.ndarray], n: int, rank: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, ...]:
        """With pair2 mixing: each sample's entry is the one of the rank whose row paired it (tinyvit_pairs.py),
        and so is its mate's; sets ``rank``/``row`` to it and returns (mate, mate's row), TinyViT indices."""
        match = re.search(r"epoch(\d+)$", self.folder.name)
        found: Pairing = pairing(n, int(match.group(1)) if match else 0, len(indices), indices, str(self.folder))
        self.lost = np.flatnonzero(~found.whole)
        rank[:] = found.rank
        mate_row = np.empty(n, np.int64)
        for r, ids in enumerate(indices):
            where = np.full(n, -1, np.int64)
            where[ids[::-1]] = np.arange(len(ids))[::-1]  # a key's first row in the file
            mine = found.rank == r
            row[mine], mate_row[mine] = where[mine], where[found.mate[mine]]
        return found.mate, mate_row

    def _values(self, keys_file: Path, rows: int) -> np.ndarray:
        path = keys_file.with_name(keys_file.name.replace("-keys.txt", "-values.bin"))
        guard(path, "TinyViT values file")
        size = path.stat().st_size if path.is_file() else -1
        if size != rows * self.item.itemsize:
            raise DataCorrupt(f"{path} holds {max(size, 0)} bytes, but {keys_file.name} lists {rows} keys of "
                              f"{self.item.itemsize} bytes each — the file is truncated; copy it again")
        return np.memmap(path, dtype=self.item, mode="r", shape=(rows,)) if rows else np.zeros(0, self.item)

    def items(self, at: np.ndarray) -> np.ndarray:
        """The items at positions ``at`` (Epoch.entries' ``at`` or ``mate_at``)."""
        slot = np.searchsorted(self.offsets, at, side="right") - 1
        out = np.empty(len(at), self.item)
        for s in np.unique(slot).tolist():
            here = slot == s
            out[here] = self.values[s][at[here] - self.offsets[s]]
        return out


class Spill:
    """Every epoch's :meth:`Epoch.entries`, in an unlinked temporary file (under ``TMPDIR``) mapped into memory:
    4 B per sample and epoch (12 with pair2 mixing) that the page cache holds or drops, so memory stays flat
    however many epochs a source has (on a disk; a tmpfs ``TMPDIR`` is memory), and nothing is left behind however
    the import ends. :meth:`close` gives the room back."""

    def __init__(self, epochs: int, num_samples: int, paired: bool) -> None:
        dtype = PAIRED_ENTRY if paired else ENTRY
        self._file = None
        if epochs * num_samples == 0:
            self.entries = np.zeros((epochs, num_samples), dtype)
            return
        size = epochs * num_samples * dtype.itemsize
        file = None
        try:
            file = tempfile.TemporaryFile(prefix="kdcache-tinyvit-")  # noqa: SIM115 - open until close()
            os.posix_fallocate(file.fileno(), 0, size)  # no room found later would kill the process (SIGBUS)
        except OSError as exc:
            if file is not None:
                file.close()
            raise InvalidSpec(f"the index of {epochs} epochs x {num_samples} samples needs {size / 2**20:,.1f} MiB in "
                              f"{tempfile.gettempdir()}, which refused it ({exc.strerror}) — set TMPDIR to a folder "
                              "with room") from None
        self._file = file
        self.entries = np.memmap(file, dtype=dtype, mode="r+", shape=(epochs, num_samples))

    def close(self) -> None:
        """Give the file's room back now, not when the garbage collector meets the last reference."""
        if self._file is not None:
            self.entries = np.zeros((0, 0), self.entries.dtype)
            self._file.close()
            self._file = None


def rank_files(folder: Path) -> list[Path]:
    """An epoch folder's ``rank<R>-keys.txt`` in rank order; MissingData where there are none."""
    ranks = sorted((int(m.group(1)), p) for p in folder.glob("rank*-keys.txt")
                   if (m := re.fullmatch(r"rank([0-9]+)-keys\.txt", p.name)))
    if not ranks:
        raise MissingData(f"{folder} has no rank<R>-keys.txt — it is not a TinyViT logits folder")
    return [keys_file for _, keys_file in ranks]


def _keys(path: Path) -> list[str]:
    """The keys of a ``rank<R>-keys.txt``, one per line; DataCorrupt for a file that is not ASCII text."""
    file_size(path, "TinyViT keys file", MAX_KEYS_BYTES, "MAX_KEYS_BYTES")
    try:
        return path.read_bytes().decode("ascii").split()
    except UnicodeDecodeError:
        raise DataCorrupt(f"{path} is not a list of sample keys (it is not ASCII text) — the file is damaged") from None


def epochs(src: Path) -> tuple[int, list[Path]]:
    """(K, the epoch folders in epoch order); InvalidSpec where epochs are missing or K differs."""
    guard(src, "TinyViT logits folder")
    named = [(m, p) for p in sorted(src.iterdir()) if (m := _EPOCH.match(p.name))] if src.is_dir() else []
    stray = next((p for _, p in named if not p.is_dir()), None)
    if stray is not None:
        raise InvalidSpec(f"{stray} is named like an epoch folder but is not a folder — move it away")
    if not named:
        raise MissingData(f"{src} holds no logits_top<K>_epoch<E> folders — pass TinyViT's DISTILL.TEACHER_LOGITS_PATH")
    ks = {int(m.group(1)) for m, _ in named}
    if len(ks) > 1:
        raise InvalidSpec(f"{src} holds logits of top-{sorted(ks)} — import one K at a time from a folder of its own")
    by_epoch = {int(m.group(2)): p for m, p in named}
    missing = next((e for e, have in enumerate(sorted(by_epoch)) if e != have), None)  # not range(max): 1e11 of them
    if missing is not None:
        raise MissingData(f"{src} lacks epoch {missing} of 0..{max(by_epoch)} — every epoch up to the last is a view")
    return ks.pop(), [by_epoch[e] for e in sorted(by_epoch)]


def key_resolver(source: Source, order: np.ndarray) -> Callable[[str, str], int]:
    """How a key names a sample, as its TinyViT index (``order``: the kdcache index of each): ``str(index)`` for
    ImageNet-1k's dataset, or the image's file name without extension for ImageNet-22k's
    (``data/imagenet22k_dataset.py``: its keys are the names of ``in22k_image_names.txt``)."""
    n = len(order)
    stems: dict[str, int] | None = None

    def resolve(key: str, where: str) -> int:
        nonlocal stems
        if key.isascii() and key.isdigit():
            if int(key) >= n:
                raise InvalidSpec(f"{where}: key {key!r} is not a sample index below {n} — pass the --dataset the "
                                  "logits were saved for")
            return int(key)
        if stems is None:
            by_stem = image_stems(source, where, key)
            position = np.argsort(order)  # kdcache index -> TinyViT index
            stems = {stem: int(position[i]) for stem, i in by_stem.items()}
        if key not in stems:
            raise InvalidSpec(f"{where}: key {key!r} names no image of the dataset — pass the --dataset the logits "
                              "were saved for")
        return stems[key]

    return resolve


def image_stems(source: Source, where: str, key: str) -> dict[str, int]:
    """{file name without extension: kdcache index} of the dataset's train images; InvalidSpec where the dataset
    has no files or two images share a name."""
    files = getattr(source.train, "files", None)
    if files is None:
        raise InvalidSpec(f"{where}: key {key!r} names an image file, and the dataset has no files — import over the "
                          "imagefolder: dataset the logits were saved for")
    stems: dict[str, int] = {}
    for i in sorted(range(len(files)), key=files.__getitem__):  # the first name met twice, in path order
        stem = Path(files[i]).name.rsplit(".", 1)[0]
        if stems.setdefault(stem, i) != i:
            raise InvalidSpec(f"two images of the dataset are named {stem!r} — TinyViT's names key one image")
    return stems


def names_keyed(folder: Path) -> bool:
    """Whether an epoch folder's keys name images (ImageNet-22k) rather than give indices."""
    keys = _keys(rank_files(folder)[0])[:1]
    return bool(keys) and not (keys[0].isascii() and keys[0].isdigit())


def list_order(folder: Path, source: Source) -> np.ndarray:
    """With pair2 mixing and keys that name images: the kdcache index of each position of TinyViT's own list
    (``in22k_image_names.txt``), which its sampler's rows index. Rebuilt from the first epoch folder: rank r's keys
    are the names at the first appearances in its rows (tinyvit_pairs.py), so each key names the image at a
    position the sampler gives; every other epoch is then checked against the sampler (Epoch.entries)."""
    n = len(source.train)
    keys_files = rank_files(folder)
    match = re.search(r"epoch(\d+)$", folder.name)
    rows = sampler_rows(n, int(match.group(1)) if match else 0, len(keys_files))
    named = np.full(n, -1, np.int64)
    stems: dict[str, int] | None = None
    for r, keys_file in enumerate(keys_files):
        keys = _keys(keys_file)
        stems = stems if stems is not None else image_stems(source, str(keys_file), keys[0] if keys else "")
        seq = rows[r::len(keys_files)].reshape(-1)
        positions = seq[np.sort(np.unique(seq, return_index=True)[1])]
        if len(keys) != len(positions):
            raise InvalidSpec(f"{keys_file}: {len(keys)} keys, where TinyViT's sampler gives rank {r} {len(positions)} "
                              f"of {n} samples — pass the --dataset the logits were saved for")
        for key, t in zip(keys, positions.tolist()):
            if key not in stems:
                raise InvalidSpec(f"{keys_file}: key {key!r} names no image of the dataset — pass the --dataset the "
                                  "logits were saved for")
            if named[t] not in (-1, stems[key]):
                raise InvalidSpec(f"{keys_file}: the sampler's position {t} is named both {key!r} and another image — "
                                  "the logits were saved with another torch or another dataset")
            named[t] = stems[key]
    if len(np.unique(named)) != n:
        raise InvalidSpec(f"{folder}: one image is named at two of the sampler's positions — the logits were saved with "
                          "another torch or another dataset")
    return named
