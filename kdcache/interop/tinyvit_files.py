"""TinyViT's saved-logits files: the epoch folders, each rank's keys and fixed-size items, and which entry of a
key kdcache reads (microsoft/Cream 4a13c40, TinyViT/data/augmentation/manager.py, dataset_wrapper.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdcache.data.images import Source
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.interop.tinyvit_pairs import Pairing, pairing
from kdcache.locations import guard

_EPOCH = re.compile(r"logits_top(\d+)_epoch(\d+)$")


class Epoch:
    """One ``logits_top<K>_epoch<E>`` folder: where each sample's item is, and the items (memory-mapped).

    A key the sampler padded into several rank files has one whole (seed, logits) entry in each; TinyViT with as
    many ranks trains on each of them (a rank reads only its own file). kdcache keeps one view per (sample, epoch):
    the highest rank's entry, or with pair2 mixing the row ``tinyvit_pairs.pairing`` picks (docs/interop.md).
    """

    def __init__(self, folder: Path, k: int, num_samples: int, resolve: Callable[[str, str], int],
                 paired: bool = False) -> None:
        self.item = np.dtype([("seed", "<i4"), ("ids", "<i2", (k,)), ("probs", "<f2", (k,))])
        self.folder = folder
        ranks = sorted((int(m.group(1)), p) for p in folder.glob("rank*-keys.txt")
                       if (m := re.fullmatch(r"rank(\d+)-keys\.txt", p.name)))
        if not ranks:
            raise MissingData(f"{folder} has no rank<R>-keys.txt — it is not a TinyViT logits folder")
        self.rank = np.full(num_samples, -1, np.int32)  # int32: an epoch of ImageNet-1k holds 1.3 M of each
        self.row = np.zeros(num_samples, np.int32)
        self.values, indices = [], []
        for slot, (_, keys_file) in enumerate(ranks):
            keys = _keys(keys_file)
            self.values.append(self._values(keys_file, len(keys)))
            indices.append(np.array([resolve(key, str(keys_file)) for key in keys], dtype=np.int64))
            for row, t in enumerate(indices[-1].tolist()):
                if self.rank[t] < 0 or slot > self.rank[t]:  # padded into several ranks: the highest (docstring)
                    self.rank[t], self.row[t] = slot, row
        if (self.rank < 0).any():
            raise MissingData(f"{folder} has no logits of sample {int(np.argmax(self.rank < 0))} — the dataset has "
                              f"{num_samples} samples; pass the --dataset the logits were saved for")
        self.mate = self.mate_row = None
        self.lost = np.zeros(0, np.int64)
        if paired:
            self._pair(indices, num_samples)

    def _pair(self, indices: list[np.ndarray], n: int) -> None:
        """With pair2 mixing: each sample's entry is the one of the rank whose row paired it (tinyvit_pairs.py),
        and so is its mate's; a sample whose mate's seed in that row was not saved is refused."""
        match = re.search(r"epoch(\d+)$", self.folder.name)
        found: Pairing = pairing(n, int(match.group(1)) if match else 0, len(indices), indices, str(self.folder))
        self.lost = np.flatnonzero(~found.whole)  # mixed with a padded copy whose seed in that row was not saved
        self.rank, self.mate = found.rank.astype(np.int32), found.mate.astype(np.int32)
        self.row, self.mate_row = np.empty(n, np.int32), np.empty(n, np.int32)
        for r, ids in enumerate(indices):
            where = np.full(n, -1, np.int64)
            where[ids[::-1]] = np.arange(len(ids))[::-1]  # a key's first row in the file
            mine = found.rank == r
            self.row[mine], self.mate_row[mine] = where[mine], where[found.mate[mine]]

    def _values(self, keys_file: Path, rows: int) -> np.ndarray:
        path = keys_file.with_name(keys_file.name.replace("-keys.txt", "-values.bin"))
        size = path.stat().st_size if path.is_file() else -1
        if size != rows * self.item.itemsize:
            raise DataCorrupt(f"{path} holds {max(size, 0)} bytes, but {keys_file.name} lists {rows} keys of "
                              f"{self.item.itemsize} bytes each — the file is truncated; copy it again")
        return np.memmap(path, dtype=self.item, mode="r", shape=(rows,)) if rows else np.zeros(0, self.item)

    def items(self, t: np.ndarray, mates: bool = False) -> np.ndarray:
        """The items of TinyViT samples ``t`` (``mates``: of each one's pair mate, in the same rank's file)."""
        rows = self.mate_row if mates else self.row
        out = np.empty(len(t), self.item)
        for slot, values in enumerate(self.values):
            here = self.rank[t] == slot
            out[here] = values[rows[t][here]]
        return out


def _keys(path: Path) -> list[str]:
    """The keys of a ``rank<R>-keys.txt``, one per line; DataCorrupt for a file that is not ASCII text."""
    try:
        return path.read_bytes().decode("ascii").split()
    except UnicodeDecodeError:
        raise DataCorrupt(f"{path} is not a list of sample keys (it is not ASCII text) — the file is damaged") from None


def epochs(src: Path) -> tuple[int, list[Path]]:
    """(K, the epoch folders in epoch order); InvalidSpec where epochs are missing or K differs."""
    guard(src, "TinyViT logits folder")
    found = [(m, p) for p in sorted(src.iterdir()) if p.is_dir() and (m := _EPOCH.match(p.name))] if src.is_dir() else []
    if not found:
        raise MissingData(f"{src} holds no logits_top<K>_epoch<E> folders — pass TinyViT's DISTILL.TEACHER_LOGITS_PATH")
    ks = {int(m.group(1)) for m, _ in found}
    if len(ks) > 1:
        raise InvalidSpec(f"{src} holds logits of top-{sorted(ks)} — import one K at a time from a folder of its own")
    by_epoch = {int(m.group(2)): p for m, p in found}
    missing = sorted(set(range(max(by_epoch) + 1)) - set(by_epoch))
    if missing:
        raise MissingData(f"{src} lacks epoch {missing[0]} of 0..{max(by_epoch)} — every epoch up to the last is a view")
    return ks.pop(), [by_epoch[e] for e in sorted(by_epoch)]


def key_resolver(source: Source, order: np.ndarray, names: bool = True) -> Callable[[str, str], int]:
    """How a key names a sample (its index in ImageFolder order): ``str(index)`` for ImageNet-1k's dataset, or the
    image's file name without extension for ImageNet-22k's (``data/imagenet22k_dataset.py``: its keys are the
    names of ``in22k_image_names.txt``); ``names``: whether names are taken (not with pair2 mixing)."""
    n = len(order)
    files = getattr(source.train, "files", None)
    stems: dict[str, int] | None = None

    def resolve(key: str, where: str) -> int:
        nonlocal stems
        if key.isdigit():
            if int(key) >= n:
                raise InvalidSpec(f"{where}: key {key!r} is not a sample index below {n} — pass the --dataset the "
                                  "logits were saved for")
            return int(key)
        if not names:
            raise InvalidSpec(f"{where}: key {key!r} names an image, and the logits were saved with pair2 mixing, whose "
                              "rows are positions in TinyViT's own list (in22k_image_names.txt); kdcache does not "
                              "rebuild that list's order — import logits saved without mixing")
        if files is None:
            raise InvalidSpec(f"{where}: key {key!r} names an image file, and the dataset has no files — import "
                              "over the imagefolder: dataset the logits were saved for")
        if stems is None:
            stems = {}
            for t in range(n):
                stem = Path(files[int(order[t])]).name.rsplit(".", 1)[0]
                if stems.setdefault(stem, t) != t:
                    raise InvalidSpec(f"two images of the dataset are named {stem!r} — TinyViT's names key one image")
        if key not in stems:
            raise InvalidSpec(f"{where}: key {key!r} names no image of the dataset — pass the --dataset the logits "
                              "were saved for")
        return stems[key]

    return resolve


