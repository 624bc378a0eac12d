"""Image sets and the Source record: what every dataset source gives (kdcache/data.py opens them by spec).

A split is an :class:`ImageSet` of ``(uint8 image [C,H,W], int label)`` with all labels readable
without decoding an image; a :class:`Source` is both splits plus what models, augmentations and caches
need to know, including the fingerprint that identifies the exact data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image


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

    def load(self, i: int, reduce: Reduce | None = None) -> torch.Tensor:
        """Image ``i``; with ``reduce``, a JPEG is decoded at ``1/reduce(width, height)`` of its size
        by libjpeg's DCT scaling (Pillow's ``draft``), which sets that cost aside. Sets of decoded
        pixels ignore ``reduce``."""
        return self[i][0]


#: (full width, full height) -> the factor r in {1, 2, 4, 8} to decode a JPEG at 1/r of its size.
Reduce = Callable[[int, int], int]


def decode_image(image: Image.Image, mode: str, reduce: Reduce | None = None) -> torch.Tensor:
    """An opened (not yet decoded) PIL image as uint8 [C,H,W] in ``mode``, at the reduction ``reduce`` asks."""
    from torchvision.transforms.functional import pil_to_tensor

    if reduce is not None and image.format == "JPEG":
        r = reduce(*image.size)
        if r > 1:
            image.draft(mode, (-(-image.size[0] // r), -(-image.size[1] // r)))
    return pil_to_tensor(image.convert(mode))


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

    def load(self, i: int, reduce: Reduce | None = None) -> torch.Tensor:
        with Image.open(self.root / self.files[i]) as im:
            return decode_image(im, self.mode, reduce)


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


def read_only_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as a read-only int64 array (sources are shared within a process)."""
    labels = np.array(labels, dtype=np.int64)
    labels.flags.writeable = False
    return labels
