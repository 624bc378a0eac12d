"""Small sources in other systems' layouts, written by their own rules, and their readers' views.

Nothing here imports kdcache.interop: each writer and reader is a transcription of the other project's
code, named where it follows it, so the tests compare kdcache's import against that code's behaviour. ml-dr's
are in mldr_sources.py (re-exported here), the image folder in source_folder.py; TinyViT's are here:

- TinyViT (microsoft/Cream 4a13c40, TinyViT/): ``save_logits.py`` (``save_logits_one_epoch``, the config.json
  it dumps), ``data/sampler.py`` (``MyDistributedSampler``), ``data/augmentation/manager.py`` (``_Writer``),
  ``dataset_wrapper.py`` (seed and item layout), ``aug_random.py`` (the PCG64 stream), ``transforms.py``
  (``RandomResizedCropAndInterpolation``), ``aug_tv_transforms.py`` (``RandomHorizontalFlip``). Checked against
  that code, run unchanged (docs/interop.md, "Checked against the real code").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from mldr_sources import mldr_densify, mldr_pixels, mldr_view, write_mldr  # noqa: F401  (one place to import from)
from PIL import Image
from source_folder import CLASSES, SIZE, make_folder  # noqa: F401
from torchvision import transforms as T
from torchvision.transforms import functional as F

# --- TinyViT ---------------------------------------------------------------------------------------------

def tinyvit_config(path: Path, **changes: Any) -> Path:
    """A config.json as ``save_logits.py`` dumps it (``config.dump()`` of ``config.py``'s tree, YAML; TinyViT at
    Cream 4a13c40), with the augmentation kdcache replays; ``changes`` are ``SECTION.KEY=value`` (or a
    top-level ``KEY``). The real file holds the whole tree; the keys the import reads are the ones here."""
    import yaml

    config: dict[str, Any] = {
        "DATA": {"IMG_SIZE": 40, "INTERPOLATION": "bicubic", "MEAN_AND_STD_TYPE": "default", "DATASET": "imagenet"},
        "AUG": {"COLOR_JITTER": 0.0, "AUTO_AUGMENT": "none", "REPROB": 0.0, "REMODE": "pixel", "RECOUNT": 1,
                "MIXUP": 0.0, "CUTMIX": 0.0, "CUTMIX_MINMAX": None, "MIXUP_PROB": 1.0, "MIXUP_SWITCH_PROB": 0.5,
                "MIXUP_MODE": "batch"},
        "DISTILL": {"LOGITS_TOPK": 2, "SAVE_TEACHER_LOGITS": True},
        "MODEL": {"NAME": "tiny_vit", "TYPE": "clip_vit_large14_224", "NUM_CLASSES": 1000},
        "AMP_ENABLE": True, "SEED": 0,
    }
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    path.write_text(yaml.safe_dump(config))
    return path


class _AugRandom:
    """``data/augmentation/aug_random.py``: ``random`` (random, uniform, randint, gauss) on one
    ``Generator(PCG64(seed))``, the stream ``AugRandomContext(seed)`` installs."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed=seed))

    def random(self) -> float:
        return self.rng.random()

    def uniform(self, a: float, b: float) -> float:
        return self.random() * (b - a) + a

    def randint(self, a: int, b: int) -> int:
        return min(int(self.random() * (b - a + 1)) + a, b)

    def gauss(self, mu: float, sigma: float) -> float:
        return self.rng.normal(mu, sigma)


def tinyvit_params(rand: _AugRandom, img: Image.Image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """``data/augmentation/transforms.py`` ``RandomResizedCropAndInterpolation.get_params``."""
    area = img.size[0] * img.size[1]
    for _ in range(10):
        target_area = rand.uniform(*scale) * area
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect_ratio = math.exp(rand.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= img.size[0] and h <= img.size[1]:
            return rand.randint(0, img.size[1] - h), rand.randint(0, img.size[0] - w), h, w
    in_ratio = img.size[0] / img.size[1]
    if in_ratio < min(ratio):
        w, h = img.size[0], int(round(img.size[0] / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = img.size[1], int(round(img.size[1] * max(ratio)))
    else:
        w, h = img.size
    return (img.size[1] - h) // 2, (img.size[0] - w) // 2, h, w


def tinyvit_view(folder: Path, seed: int, index: int, size: int = 40, interpolation: str = "bicubic") -> torch.Tensor:
    """What TinyViT's training transform makes of sample ``index`` under ``AugRandomContext(seed)``
    (``dataset_wrapper.py`` ``__getitem__``; ``transforms_factory.py`` ``transforms_imagenet_train`` with
    AUTO_AUGMENT none and REPROB 0: the crop of ``transforms.py`` ``__call__`` resized with
    DATA.INTERPOLATION, ``aug_tv_transforms.py`` ``RandomHorizontalFlip``, ToTensor; before Normalize)."""
    img = torchvision.datasets.ImageFolder(str(folder / "train"))[index][0]
    rand = _AugRandom(seed)
    i, j, h, w = tinyvit_params(rand, img)
    img = F.resized_crop(img, i, j, h, w, (size, size), T.InterpolationMode(interpolation))
    if rand.random() < 0.5:
        img = F.hflip(img)
    return F.to_tensor(img)


def tinyvit_order(n: int, epoch: int, world: int) -> list[int]:
    """``data/sampler.py`` ``MyDistributedSampler.__iter__`` without pairs: ``torch.randperm`` seeded with
    ``0 + epoch``, padded with its own head to a multiple of the world size; rank r takes ``[r::world]``."""
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
    total = -(-n // world) * world
    return indices + indices[: total - n]


def toy_teacher(view: torch.Tensor) -> torch.Tensor:
    """A fixed function of a view's pixels standing in for the teacher: its softmax over the 3 classes, so that
    a target read from the wrong entry belongs to another view."""
    weights = torch.tensor([[3.0, -2.0, 1.0], [-1.0, 4.0, -2.0], [2.0, 1.0, -3.0]], dtype=torch.float64)
    return torch.softmax(weights @ view.double().mean(dim=(1, 2)) * 4, 0)


def write_tinyvit(folder: Path, src: Path, epochs: int = 3, k: int = 2, ranks: int = 2, seed: int = 0,
                  size: int = 40) -> dict:
    """Saved logits of ``folder``'s train split as ``save_logits.py`` writes them (``save_logits_one_epoch``;
    ``manager.py`` ``_Writer``): per epoch and rank, the keys of the rank's samples in sampler order
    (:func:`tinyvit_order`), each item's int32 seed drawn from numpy's global stream of the rank's process
    (``dataset_wrapper.py`` ``__getitem_for_write``, seeded ``SEED + rank``), and the teacher's float16 top-k
    on the view (:func:`toy_teacher`); a key already written by the rank keeps its first item. Returns
    {(index, epoch): (seed, ids, probs)} of the entry kdcache reads: the highest rank's (kdcache/interop/tinyvit.py)."""
    n = len(torchvision.datasets.ImageFolder(str(folder / "train")))
    saved: dict[tuple[int, int], tuple[int, np.ndarray, np.ndarray]] = {}
    streams = [np.random.RandomState(seed + rank) for rank in range(ranks)]
    for epoch in range(epochs):
        path = src / f"logits_top{k}_epoch{epoch}"
        path.mkdir(parents=True)
        order = tinyvit_order(n, epoch, ranks)
        for rank in range(ranks):
            keys, values = [], b""
            for t in order[rank::ranks]:
                s = np.int32(streams[rank].randint(0, 1 << 31))  # drawn for a duplicate too, then dropped
                if str(t) in keys:
                    continue
                top, ids = toy_teacher(tinyvit_view(folder, int(s), t, size)).topk(k, sorted=True)
                top16, ids16 = top.to(torch.float16).numpy(), ids.to(torch.int16).numpy()
                keys.append(str(t))
                values += s.tobytes() + ids16.tobytes() + top16.tobytes()
                saved[(int(t), epoch)] = (int(s), ids16, top16)  # later ranks overwrite: the highest rank's entry
            (path / f"rank{rank}-keys.txt").write_text("".join(key + "\n" for key in keys))
            (path / f"rank{rank}-values.bin").write_bytes(values)
    return saved
