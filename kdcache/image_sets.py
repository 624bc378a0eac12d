"""Image sets and the Source record: what every dataset source gives (kdcache/data.py opens them by spec).

A split is an :class:`ImageSet` of ``(uint8 image [C,H,W], int label)`` with all labels readable
without decoding an image; a :class:`Source` is both splits plus what models, augmentations and caches
need to know, including the fingerprint that identifies the exact data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(self.root / self.files[i]) as im:
            image = pil_to_tensor(im.convert(self.mode))
        return image, int(self.labels[i])


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
