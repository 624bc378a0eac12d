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


TINYVIT_RA = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
              "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]  # auto_augment.py _RAND_INCREASING_TRANSFORMS


def _tinyvit_op(img: Image.Image, name: str, level: float, rand: _AugRandom, fill: tuple, resample: int):
    """``AugmentOp.__call__`` after its magnitude: ``LEVEL_TO_ARG[name]`` (``_randomly_negate`` drawing the sign),
    then ``NAME_TO_OP[name]`` as auto_augment.py calls Pillow."""
    from PIL import ImageEnhance, ImageOps

    def negate(v: float) -> float:
        return -v if rand.random() > 0.5 else v

    kwargs = {"fillcolor": fill, "resample": resample}
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(negate(level / 10 * 30.0), **kwargs)
    if name == "PosterizeIncreasing":
        bits = 4 - int(level / 10 * 4)
        return img if bits >= 8 else ImageOps.posterize(img, bits)
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, 256 - int(level / 10 * 256))
    if name == "SolarizeAdd":
        add = int(level / 10 * 110)
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    if name.endswith("Increasing"):
        factor = max(0.1, 1.0 + negate(level / 10 * 0.9))
        return getattr(ImageEnhance, name[: -len("Increasing")])(img).enhance(factor)
    if name in ("ShearX", "ShearY"):
        f = negate(level / 10 * 0.3)
        return img.transform(img.size, Image.AFFINE, (1, f, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, f, 1, 0),
                             **kwargs)
    pct = negate(level / 10 * 0.45)
    matrix = (1, 0, pct * img.size[0], 0, 1, 0) if name == "TranslateXRel" else (1, 0, 0, 0, 1, pct * img.size[1])
    return img.transform(img.size, Image.AFFINE, matrix, **kwargs)


def tinyvit_randaugment(img: Image.Image, rand: _AugRandom, fill: tuple, resample: int) -> Image.Image:
    """``RandAugment.__call__`` of ``rand-m9-mstd0.5-inc1``: ``np_random.choice`` of 2 ops with replacement; each
    applied when ``random() <= 0.5``, at magnitude ``gauss(9, 0.5)`` clipped to [0, 10]."""
    for k in rand.rng.choice(len(TINYVIT_RA), 2, replace=True):
        if rand.random() > 0.5:
            continue
        level = max(0.0, min(rand.gauss(9, 0.5), 10.0))
        img = _tinyvit_op(img, TINYVIT_RA[k], level, rand, fill, resample)
    return img


def tinyvit_erase(x: torch.Tensor, rand: _AugRandom, probability: float) -> list[tuple[int, int, int, int]]:
    """``random_erasing.py`` ``RandomErasing._erase`` in 'pixel' mode, one box, on the normalised item ``x``
    (in place): the box drawn in the 224 x 224 reference frame, scaled to the view, filled from
    ``Generator(MT19937(randint(0, 1 << 30))).normal``. Returns the boxes erased."""
    if rand.random() > probability:
        return []
    chan, img_h, img_w = x.shape
    for _ in range(10):
        target_area = rand.uniform(0.02, 1 / 3) * 224 * 224
        aspect_ratio = math.exp(rand.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = int(round(math.sqrt(target_area * aspect_ratio))), int(round(math.sqrt(target_area / aspect_ratio)))
        if w < 224 and h < 224:
            top, left = rand.randint(0, 224 - h), rand.randint(0, 224 - w)
            top, left = min(int(round(top * img_h / 224)), img_h - 1), min(int(round(left * img_w / 224)), img_w - 1)
            h, w = min(int(round(h * img_h / 224)), img_h - top), min(int(round(w * img_w / 224)), img_w - left)
            noise = np.random.Generator(np.random.MT19937(rand.randint(0, 1 << 30))).normal(size=(chan, h, w))
            x[:, top:top + h, left:left + w] = torch.tensor(noise, dtype=torch.float32)
            return [(top, left, h, w)]
    return []


TINYVIT_MEAN, TINYVIT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tinyvit_item(folder: Path, seed: int, index: int, size: int = 40,
                 reprob: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, list]:
    """TinyViT's default training transform (``rand-m9-mstd0.5-inc1``, REPROB ``reprob`` in pixel mode, bicubic,
    the default mean and std) under ``AugRandomContext(seed)``: (the uint8 view before ToTensor, as [0, 1]
    floats; the normalised, erased item the teacher saw; the erased boxes)."""
    img = torchvision.datasets.ImageFolder(str(folder / "train"))[index][0]
    rand = _AugRandom(seed)
    i, j, h, w = tinyvit_params(rand, img)
    img = F.resized_crop(img, i, j, h, w, (size, size), T.InterpolationMode.BICUBIC)
    if rand.random() < 0.5:
        img = F.hflip(img)
    fill = tuple(min(255, round(255 * m)) for m in TINYVIT_MEAN)
    img = tinyvit_randaugment(img, rand, fill, Image.BICUBIC)
    pixels = F.to_tensor(img)
    item = F.normalize(pixels.clone(), TINYVIT_MEAN, TINYVIT_STD)
    boxes = tinyvit_erase(item, rand, reprob) if reprob > 0 else []
    return pixels, item, boxes


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
                  size: int = 40, default_aug: bool = False, keys: list[str] | None = None) -> dict:
    """Saved logits of ``folder``'s train split as ``save_logits.py`` writes them (``save_logits_one_epoch``;
    ``manager.py`` ``_Writer``): per epoch and rank, the keys of the rank's samples in sampler order
    (:func:`tinyvit_order`), each item's int32 seed drawn from numpy's global stream of the rank's process
    (``dataset_wrapper.py`` ``__getitem_for_write``, seeded ``SEED + rank``), and the teacher's float16 top-k
    on the view (:func:`toy_teacher`; with ``default_aug`` on the normalised item of :func:`tinyvit_item`); a key
    already written by the rank keeps its first item; ``keys`` replaces ``str(index)`` (ImageNet-22k). Returns
    {(index, epoch): (seed, ids, probs)} of the entry kdcache reads: the highest rank's (kdcache/interop/tinyvit.py)."""
    n = len(torchvision.datasets.ImageFolder(str(folder / "train")))
    names = keys  # ImageNet-22k's keys: image names instead of str(index)
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
                key = str(t) if names is None else names[t]
                if key in keys:
                    continue
                view = tinyvit_item(folder, int(s), t, size)[1] if default_aug else tinyvit_view(folder, int(s), t, size)
                top, ids = toy_teacher(view).topk(k, sorted=True)
                top16, ids16 = top.to(torch.float16).numpy(), ids.to(torch.int16).numpy()
                keys.append(key)
                values += s.tobytes() + ids16.tobytes() + top16.tobytes()
                saved[(int(t), epoch)] = (int(s), ids16, top16)  # later ranks overwrite: the highest rank's entry
            (path / f"rank{rank}-keys.txt").write_text("".join(key + "\n" for key in keys))
            (path / f"rank{rank}-values.bin").write_bytes(values)
    return saved


def tinyvit_rows(n: int, epoch: int, world: int) -> list[list[tuple[int, int]]]:
    """``MyDistributedSampler.__iter__`` with ``pair``: the padded ``torch.randperm`` (seed ``0 + epoch``) as rows
    of two; rank r's rows ``r::world``."""
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    total = -(-n // (2 * world)) * 2 * world
    indices = torch.cat([indices, indices[: total - n]]) if total - n <= n else indices.repeat(-(-total // n))[:total]
    rows = [tuple(r) for r in indices.view(-1, 2).tolist()]
    return [rows[r::world] for r in range(world)]


def tinyvit_pair2(a: torch.Tensor, b: torch.Tensor, seed_a: int, seed_b: int, mixup: float = 0.8,
                  cutmix: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixup.py`` ``Mixup._mix_pair2`` on one pair (rows i, i+1 of the batch) with ``_params_per_batch`` and
    ``cutmix_bbox_and_lam`` drawing on ``AugRandomContext(seed_a ^ seed_b)``; MIXUP_PROB 1, SWITCH 0.5."""
    rand = _AugRandom(int(seed_a ^ seed_b))
    lam, use_cutmix = 1.0, False
    if rand.rng.random(()) < 1.0:
        use_cutmix = rand.rng.random(()) < 0.5
        lam = float(rand.rng.beta(cutmix, cutmix) if use_cutmix else rand.rng.beta(mixup, mixup))
    x = torch.stack([a, b])
    if lam == 1.0:
        return x[0], x[1]
    if use_cutmix:
        side = a.shape[-1]
        cut = int(side * np.sqrt(1 - lam))
        cy, cx = rand.randint(0, side - 1), rand.randint(0, side - 1)
        yl, yh = np.clip(cy - cut // 2, 0, side), np.clip(cy + cut // 2, 0, side)
        xl, xh = np.clip(cx - cut // 2, 0, side), np.clip(cx + cut // 2, 0, side)
        x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    else:
        flipped = x.flip(0).mul_(1.0 - lam)
        x.mul_(lam).add_(flipped)
    return x[0], x[1]


def write_tinyvit_mixed(folder: Path, src: Path, epochs: int = 2, k: int = 2, ranks: int = 2, seed: int = 0,
                        size: int = 40, batch: int = 4, keys: list[str] | None = None,
                        images: list[int] | None = None) -> dict:
    """Saved logits as ``save_logits.py`` writes them with the default config's mixing: each rank walks its rows
    in batches of ``batch``, draws every item's seed (:func:`tinyvit_item`), mixes each row (:func:`tinyvit_pair2`),
    runs the teacher on the mixed items and keeps a key's first entry. ``keys`` and ``images`` give TinyViT's own
    list (ImageNet-22k's ``in22k_image_names.txt``): position t is keyed ``keys[t]`` and is ImageFolder image
    ``images[t]``. Returns {(position, epoch): [(mixed item, seed, mate seed, ids, probs) of each row whose two saved
    entries are that row's]}."""
    n = len(torchvision.datasets.ImageFolder(str(folder / "train")))
    streams = [np.random.RandomState(seed + rank) for rank in range(ranks)]
    found: dict[tuple[int, int], list] = {}
    for epoch in range(epochs):
        path = src / f"logits_top{k}_epoch{epoch}"
        path.mkdir(parents=True)
        for rank, rows in enumerate(tinyvit_rows(n, epoch, ranks)):
            saved: dict[int, tuple] = {}
            names, values, written = [], b"", []
            for a, b in rows:
                sa, sb = (np.int32(streams[rank].randint(0, 1 << 31)) for _ in (a, b))
                ia, ib = (images[a], images[b]) if images is not None else (a, b)
                xa, xb = tinyvit_pair2(tinyvit_item(folder, int(sa), ia, size)[1],
                                       tinyvit_item(folder, int(sb), ib, size)[1], int(sa), int(sb))
                written.append(((a, sa, xa), (b, sb, xb)))
                for t, s, x in ((a, sa, xa), (b, sb, xb)):
                    top, ids = toy_teacher(x).topk(k, sorted=True)
                    if t not in saved:
                        saved[t] = (int(s), ids.to(torch.int16).numpy(), top.to(torch.float16).numpy())
                        names.append(str(t) if keys is None else keys[t])
                        values += s.tobytes() + saved[t][1].tobytes() + saved[t][2].tobytes()
            for pair in written:
                for (t, s, x), (m, sm, _) in (pair, pair[::-1]):
                    if saved[t][0] == int(s) and saved[m][0] == int(sm):
                        found.setdefault((t, epoch), []).append((x, int(s), int(sm), *saved[t][1:]))
            (path / f"rank{rank}-keys.txt").write_text("".join(key + "\n" for key in names))
            (path / f"rank{rank}-values.bin").write_bytes(values)
    return found
