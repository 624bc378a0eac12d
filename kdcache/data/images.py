"""Image sets and the Source record: what every dataset source gives (kdcache/data/ opens them by spec).

A split is an :class:`ImageSet` of ``(uint8 image [C,H,W], int label)`` with all labels readable
without decoding an image; a :class:`Source` is both splits plus what models, augmentations and caches
need to know, including the fingerprint that identifies the exact data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from kdcache.data.decode import Reduce, decode_bytes, decode_image


class ImageSet(torch.utils.data.Dataset):
    """One split. ``__getitem__(i) -> (image: torch.uint8 tensor [C,H,W], label: int)``.

    ``labels`` (int64 [N], read-only) gives every label without decoding any image.
    """

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

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
        return self.images[i].clone(), int(self.labels[i])


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
        with Image.open(self.root / self.files[i]) as im:
            return im.size

    def load(self, i: int, reduce: Reduce | None = None) -> torch.Tensor:
        if reduce is not None:
            return decode_bytes((self.root / self.files[i]).read_bytes(), self.mode, reduce)
        with Image.open(self.root / self.files[i]) as im:
            return decode_image(im, self.mode)


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
