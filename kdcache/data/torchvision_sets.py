"""torchvision's CIFAR10, CIFAR100, MNIST, FashionMNIST and KMNIST (``torchvision:NAME:ROOT``), read from where
they were downloaded: kdcache never downloads, a missing set is one line saying where its files go."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.data.images import Source, TensorImageSet, tensor_source
from kdcache.data.spec import DatasetSpec
from kdcache.errors import MissingData


def open_torchvision(spec: DatasetSpec) -> Source:
    import torchvision.datasets

    name, root = spec.name, spec.path
    cls = getattr(torchvision.datasets, name)
    splits = []
    for train in (True, False):
        try:
            data = cls(root=root, train=train, download=False)
        except RuntimeError:
            raise MissingData(f"torchvision {name} not found under {root} — download it there "
                              "first (kdcache never downloads)") from None
        images = torch.as_tensor(np.asarray(data.data))
        # CIFAR stores [N,H,W,C]; the MNIST family stores [N,H,W].
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)
        splits.append(TensorImageSet(images, np.asarray(data.targets, dtype=np.int64)))
    return tensor_source(spec.text, splits[0], splits[1], tuple(data.classes))
