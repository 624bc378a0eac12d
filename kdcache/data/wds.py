"""WebDataset tar shards as a dataset source: ``wds:PATTERN[?image=jpg,png,webp&label=cls&val=PATTERN]``.

A shard is a plain tar whose members ``<key>.<ext>`` group into samples by key (the WebDataset
convention). A cache addresses samples by index, so every sample gets one from a single scan of the
shards' member names: shard order (the expanded pattern), then member order. The scan records each
image member's byte range, so a sample is later read by one ranged read of its shard, on a local disk
or through fsspec (``s3://…``), never by reading the tar from its start. Plain ``tarfile`` over fsspec
is used instead of the ``webdataset`` package because that one streams samples in order and offers no
reads by index (docs/datasets-and-models.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Iterator, Sequence

import torch

from kdcache.data.decode import UNDECODABLE, Reduce, decode_bytes, header
from kdcache.data.images import ImageSet, Source, file_statistics, read_only_labels
from kdcache.data.spec import DatasetSpec, expand_braces
from kdcache.data.wds_index import ShardIndex, require, scan, sibling_split
from kdcache.errors import DataCorrupt, MissingData
from kdcache.locations import filesystem, is_remote

MERGE_GAP = 256 << 10  # members closer than this in a shard are fetched as one range


class ShardReader:
    """Ranged reads of image members, one open file per shard and process (fsspec files are not
    fork-safe, so a DataLoader worker opens its own), read ahead so that neighbouring samples of a
    shard cost one request."""

    READAHEAD = 8 << 20

    def __init__(self, urls: tuple[str, ...]) -> None:
        self.urls = urls
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= 4:  # an epoch moves through the shards: keep the few in use open
                self._files.pop(next(iter(self._files))).close()
            fs, path = filesystem(self.urls[shard])
            f = self._files[shard] = fs.open(path, "rb", block_size=self.READAHEAD, cache_type="readahead")
        f.seek(offset)
        return f.read(size)

    def __getstate__(self) -> dict[str, Any]:
        return {"urls": self.urls}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["urls"])


@contextlib.contextmanager
def _decoding(url: str, key: str) -> Iterator[None]:
    """Turn a failed decode of sample ``key`` into one DataCorrupt line naming its shard."""
    try:
        yield
    except UNDECODABLE as exc:
        raise DataCorrupt(f"shard {url}: the image of sample {key} does not decode ({exc}) — re-create the "
                          "shard, or remove the sample") from None


class WdsImageSet(ImageSet):
    """One split of WebDataset shards, decoded on access from one ranged read per image; pickles as
    the index and the shard URLs, so DataLoader workers open their own files."""

    def __init__(self, index: ShardIndex, mode: str) -> None:
        self.index = index
        self.labels = read_only_labels(index.labels)
        self.mode = mode
        self.reader = ShardReader(index.urls)
        self.remote = any(is_remote(url) for url in index.urls)
        self._fetched: dict[int, bytes] = {}
        self._ahead: list[tuple[frozenset[int], Any]] = []  # (indices, future of their bytes)
        self._pool: Any = None

    def read_bytes(self, i: int) -> bytes:
        data = self._fetched.get(i)
        if data is not None:
            return data
        index = self.index
        return self.reader.read(int(index.shard[i]), int(index.offsets[i]), int(index.sizes[i]))

    def prefetch(self, indices: Sequence[int]) -> None:
        """Fetch the images of ``indices`` from an object store in one concurrent round: neighbouring
        members of a shard as one ranged read (a precompute batch is a few), scattered ones each on its
        own (a shuffled training batch), instead of one sequential request per image. A fetch that
        :meth:`prefetch_ahead` started for them is waited for instead."""
        if not self.remote:
            return
        wanted = frozenset(int(i) for i in indices)
        for k, (ahead, future) in enumerate(self._ahead):
            if wanted <= ahead:  # a window fetched ahead: its images stay until a later window's
                self._fetched = future.result()
                del self._ahead[:k]
                return
        self._fetched = self._fetch(wanted)

    def prefetch_ahead(self, indices: Sequence[int]) -> None:
        if not self.remote:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdcache-wds")
        wanted = frozenset(int(i) for i in indices)
        self._ahead = [*self._ahead[-1:], (wanted, self._pool.submit(self._fetch, wanted))]

    def _fetch(self, wanted: frozenset[int]) -> dict[int, bytes]:
        fetched: dict[int, bytes] = {}
        index, runs = self.index, []
        for i in sorted(wanted, key=lambda i: (index.shard[i], index.offsets[i])):
            start, end = int(index.offsets[i]), int(index.offsets[i] + index.sizes[i])
            if runs and runs[-1][0] == index.shard[i] and start - runs[-1][2] <= MERGE_GAP:
                runs[-1][2] = max(runs[-1][2], end)
                runs[-1][3].append(i)
            else:
                runs.append([index.shard[i], start, end, [i]])
        fs, _ = filesystem(index.urls[0])
        paths = [filesystem(index.urls[int(shard)])[1] for shard, *_ in runs]
        blobs = fs.cat_ranges(paths, [r[1] for r in runs], [r[2] for r in runs])
        for (_, start, _, members), blob in zip(runs, blobs):
            for i in members:
                at = int(index.offsets[i]) - start
                fetched[i] = bytes(blob[at : at + int(index.sizes[i])])
        return fetched

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fetched": {}, "_ahead": [], "_pool": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load(i), int(self.labels[i])

    def where(self, i: int) -> str:
        return f"sample {self.index.keys[i]} of shard {self.index.urls[int(self.index.shard[i])]}"

    def load(self, i: int, reduce: Reduce | None = None) -> torch.Tensor:
        data = self.read_bytes(i)  # a failed read is the storage's error, not a damaged image
        self.checked(i, data)
        with _decoding(self.index.urls[int(self.index.shard[i])], self.index.keys[i]):
            return decode_bytes(data, self.mode, reduce)


def open_wds(spec: DatasetSpec) -> Source:
    """The source ``wds:…``: both splits scanned, gray or RGB from the first train image, the ImageNet
    statistics (shards are not scanned for them), classes 0..max label, and a fingerprint of every
    shard's name and (key, image size, label) list. Without ``?val=`` the val shards are the pattern with
    its last ``train`` replaced by ``val`` (then ``test``) when those exist."""
    image_keys, label_key = spec.image_keys, spec.label_key
    train_urls = tuple(expand_braces(spec.path))
    val_pattern = spec.option("val")
    if val_pattern is None:
        require(train_urls)  # a wrong pattern is named as such, not as a missing val split
    val_urls = tuple(expand_braces(val_pattern)) if val_pattern is not None else sibling_split(spec.path)
    train = scan(train_urls, image_keys, label_key)
    val = scan(val_urls, image_keys, label_key)
    rest = spec.text.partition(":")[2]
    if not len(train.keys) or not len(val.keys):
        empty = train_urls[0] if not len(train.keys) else val_urls[0]
        raise MissingData(f"the shards of wds:{rest} hold no samples ({empty} and the rest) — check the pattern "
                          "and the member extensions (?image=…, ?label=…)")
    first = WdsImageSet(train, "RGB").read_bytes(0)
    with _decoding(train_urls[0], train.keys[0]):
        first_mode, side = header(first)
    mode, channels, mean, std = file_statistics(first_mode)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    parts = {"train": train.parts(), "val": val.parts()}
    digest = hashlib.sha256(f"wds image={','.join(image_keys)} label={label_key}\n".encode())
    for name, split in parts.items():
        for part in split:
            digest.update(f"{name}\t{part['name']}\t{part['samples']}\t{part['sha256']}\n".encode())
    return Source(spec=spec.text, train=WdsImageSet(train, mode), test=WdsImageSet(val, mode),
                  num_classes=num_classes, channels=channels, image_size=side, mean=mean, std=std,
                  classes=tuple(str(k) for k in range(num_classes)), fingerprint=f"sha256:{digest.hexdigest()}",
                  parts=tuple(parts["train"]))
