"""Image sets and the Source record: what every dataset source gives (kdcache/data/ opens them by spec).

A split is an :class:`ImageSet` of ``(uint8 image [C,H,W], int label)`` with all labels readable
without decoding an image; a :class:`Source` is both splits plus what models, augmentations and caches
need to know, including the fingerprint that identifies the exact data.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from kdcache.checksums import crc32c
from kdcache.data.decode import UNDECODABLE, Reduce, decode_bytes, file_header
from kdcache.errors import DataCorrupt


class ImageSet(torch.utils.data.Dataset):
    """One split. ``__getitem__(i) -> (image: torch.uint8 tensor [C,H,W], label: int)``.

    ``labels`` (int64 [N], read-only) gives every label without decoding any image.

    Every image read goes through :meth:`checked`, with the bytes it decodes (a file's, a shard member's, a
    row's; the pixels of a set held in memory). A copy :meth:`bound` to a cache's crc32c table refuses an
    image whose bytes are not the ones the teacher read; a :meth:`recording` copy keeps each crc32c it saw
    (precompute, which stores them). Sources are shared within a process, so neither changes the set itself.
    """

    labels: np.ndarray
    expected: np.ndarray | None = None  # uint32 [N]: the crc32c each image's bytes must have
    bound_to: str = ""  # the cache ``expected`` came from, for messages
    seen: dict[int, int] | None = None  # crc32c of the images read, when recording

    def __len__(self) -> int:
        return len(self.labels)

    def bound(self, expected: np.ndarray | None, cache: str) -> ImageSet:
        """This set, refusing an image whose bytes' crc32c is not ``expected[i]`` (None: itself, unchecked)."""
        if expected is None:
            return self
        out = copy.copy(self)
        out.expected, out.bound_to = np.asarray(expected, dtype=np.uint32), cache
        return out

    def recording(self) -> ImageSet:
        """This set, keeping the crc32c of every image it reads (:meth:`checksums` hands them out)."""
        out = copy.copy(self)
        out.seen = {}
        return out

    def checksums(self, indices: Sequence[int]) -> np.ndarray:
        """uint32 crc32c of images ``indices``, as recorded when they were read (and then forgotten)."""
        out = np.array([self.seen[int(i)] for i in indices], dtype=np.uint32)
        for i in set(int(i) for i in indices):
            self.seen.pop(i, None)
        return out

    def where(self, i: int) -> str:
        """Where image ``i`` lies, for messages (a file, a shard and key, a row)."""
        return f"sample {i}"

    def checked(self, i: int, data: bytes | np.ndarray) -> None:
        """Record and check the crc32c of the bytes image ``i`` is decoded from (see the class docstring)."""
        if self.expected is None and self.seen is None:
            return
        value = crc32c(data)
        if self.seen is not None:
            self.seen[int(i)] = value
        if self.expected is not None and value != int(self.expected[i]):
            raise DataCorrupt(f"{self.where(i)} is not the image cache {self.bound_to} was made from: its bytes "
                              f"changed (crc32c {value:08x}, the cache recorded {int(self.expected[i]):08x}) — "
                              "restore it, or precompute a cache of the data as it is now")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def prefetch(self, indices: Sequence[int]) -> None:
        """A hint that images ``indices`` are read next (a batch): sets on remote storage fetch them
        at once; the others ignore it."""

    def prefetch_ahead(self, indices: Sequence[int]) -> None:
        """A hint that the coming batches draw from images ``indices`` (a shuffle window of the student's
        reader): remote sets start fetching them in the background, in few large reads, and keep them
        until a later window's hint, so that fetching overlaps decoding."""

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image ``i`` (sets of files read it from the header)."""
        height, width = self[i][0].shape[-2:]
        return int(width), int(height)

    def load(self, i: int, reduce: Reduce | None = None) -> torch.Tensor:
        """Image ``i``; with ``reduce``, a JPEG is decoded at the smallest of libjpeg-turbo's M/8 scales
        that keeps the size ``reduce(width, height)`` asks (DCT scaling, through simplejpeg). Sets of
        decoded pixels ignore ``reduce``."""
        return self[i][0]


#: The largest class index a source may hold (ImageNet-21k has 21,841 classes): a label beyond it is damage,
#: and would make every dense target that many floats wide.
MAX_CLASSES = 1 << 20

# Image files are not scanned for statistics; these are the usual ImageNet constants.
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})  # PIL modes read as one channel


def file_statistics(mode: str) -> tuple[str, int, tuple[float, ...], tuple[float, ...]]:
    """(decode mode, channels, mean, std) for files whose (first) image has PIL mode ``mode``."""
    if mode in GRAY_MODES:
        return "L", 1, GRAY_MEAN, GRAY_STD
    return "RGB", 3, RGB_MEAN, RGB_STD


class TensorImageSet(ImageSet):
    """A split held in memory as one uint8 tensor ``images [N,C,H,W]`` (do not modify it in place:
    sources are shared within a process)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        self.images = images.contiguous()
        self.labels = read_only_labels(labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i].clone()
        self.checked(i, image.numpy())
        return image, int(self.labels[i])


class FolderImageSet(ImageSet):
    """A split of image files decoded on access; pickles as a list of paths, so it is cheap to send
    to DataLoader workers."""

    def __init__(self, root: Path, files: list[str], labels: np.ndarray, mode: str) -> None:
        self.root = root
        self.files = files
        self.labels = read_only_labels(labels)
        self.mode = mode

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load(i), int(self.labels[i])

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image ``i``, from its header (nothing is decoded)."""
        with self._decoding(i):
            return file_header(self.root / self.files[i])[1]

    def where(self, i: int) -> str:
        return f"image {self.root / self.files[i]}"

    def load(self, i: int, reduce: Reduce | None = None) -> torch.Tensor:
        with self._decoding(i):
            data = (self.root / self.files[i]).read_bytes()
            self.checked(i, data)
            return decode_bytes(data, self.mode, reduce)

    @contextlib.contextmanager
    def _decoding(self, i: int) -> Iterator[None]:
        """A file that is not a whole image (or asks for too many pixels) as one DataCorrupt line naming it."""
        try:
            yield
        except UNDECODABLE as exc:
            raise DataCorrupt(f"{self.where(i)} does not decode ({exc}) — restore or remove it") from None


@dataclass(frozen=True)
class Source:
    """A dataset: both splits plus what models, augmentations and caches need to know about it."""

    spec: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    fingerprint: str
    #: Sharded sources (``wds:``): per shard of the train split its name, sample count and the sha256 of
    #: its samples, recorded in the manifest so that a mismatch can say which shard differs.
    parts: tuple[dict[str, Any], ...] = field(default=())

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``dataset`` section of a cache of this source's train split."""
        return {
            "spec": self.spec,
            "split": "train",
            "fingerprint": self.fingerprint,
            "num_samples": len(self.train),
            "num_classes": self.num_classes,
            "channels": self.channels,
            "classes": list(self.classes),
            **({"parts": [dict(p) for p in self.parts]} if self.parts else {}),  # sharded sources (wds:)
        }


def read_only_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as a read-only int64 array (sources are shared within a process)."""
    labels = np.array(labels, dtype=np.int64)
    labels.flags.writeable = False
    return labels


def tensor_source(spec: str, train: TensorImageSet, test: TensorImageSet, classes: tuple[str, ...]) -> Source:
    """The Source of two in-memory splits: the training split's statistics and a sha256 of every pixel and label."""
    mean, std = channel_stats(train.images)
    digest = hashlib.sha256()
    for name, split in (("train", train), ("test", test)):
        digest.update(f"{name} images {tuple(split.images.shape)} uint8\n".encode())
        digest.update(split.images.numpy().data)
        digest.update(f"{name} labels {split.labels.shape} int64\n".encode())
        digest.update(split.labels.astype("<i8").tobytes())
    return Source(spec=spec, train=train, test=test, num_classes=len(classes),
                  channels=train.images.shape[1], image_size=train.images.shape[2],
                  mean=mean, std=std, classes=classes, fingerprint=f"sha256:{digest.hexdigest()}")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0,1] units; float64, chunked to bound memory."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)
