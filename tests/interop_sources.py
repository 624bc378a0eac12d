"""Small sources in other systems' layouts, written by their own rules, and their readers' views.

Nothing here imports kdcache.interop: each writer and reader is a transcription of the other project's
code, named where it follows it, so the tests compare kdcache's import against that code's behaviour.

- ml-dr (apple/ml-dr a21113c, whose code files equal c72c884): ``reinforce.py`` (``main``, ``transform_batch``,
  ``reinforce``), ``dr/transforms.py`` (``clean_config``, ``compose_from_config``, ``Compose.compress``/
  ``decompress``/``reapply``), ``transforms.py`` (``MixUp``, ``CutMix.rand_bbox``), ``dr/utils.py``
  (``sparsify``, ``densify``), ``dr/data.py`` (``ReinforcedDataset.__getitem__``). Checked against that code,
  run unchanged (docs/interop.md, "Checked against the real code").
- TinyViT (microsoft/Cream 4a13c40, TinyViT/): ``save_logits.py`` (``save_logits_one_epoch``, the config.json
  it dumps), ``data/sampler.py`` (``MyDistributedSampler``), ``data/augmentation/manager.py`` (``_Writer``),
  ``dataset_wrapper.py`` (seed and item layout), ``aug_random.py`` (the PCG64 stream), ``transforms.py``
  (``RandomResizedCropAndInterpolation``), ``aug_tv_transforms.py`` (``RandomHorizontalFlip``). Checked against
  that code, run unchanged (docs/interop.md, "Checked against the real code").
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

CLASSES = ("ant", "bee", "cat")
SIZE = 16


def make_folder(root: Path, per_class: int = 5) -> Path:
    """An image folder of PNGs of different sizes (train and val), 3 classes."""
    rng = np.random.RandomState(7)
    for split, count in (("train", per_class), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.randint(20, 60), rng.randint(20, 60)
                ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
                pixels = (ramp + rng.randint(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)
                pixels[..., c] //= 2
                Image.fromarray(pixels).save(root / split / name / f"{i:02d}.png")
    return root


# --- ml-dr (apple/ml-dr a21113c, whose code files equal c72c884) ----------------------------------------------

MLDR_NAMES = ("uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "random_horizontal_flip",
              "rand_augment", "to_tensor", "random_erase", "normalize", "mixup", "cutmix")  # TRANSFORMATION_TO_NAME
MLDR_NO_PARAM = ("uint8", "center_crop", "to_tensor", "normalize")  # dr/transforms.py NO_PARAM_TRANSFORMS
MLDR_MEAN, MLDR_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def mldr_config(mix: str | None, erase: bool, views: int, k: int, interpolation: int = 2) -> dict[str, Any]:
    """What ``reinforce.py`` ``main`` saves as config.pth.tar for a configs/imagenet/reinforce/*.yaml-style run:
    every entry with ``enable: true`` as the published configs have, ``uint8`` first, MixUp with their
    ``div_by: 2`` (λ is then at most 0.5)."""
    aug: dict[str, Any] = {"uint8": {"enable": True},
                           "random_resized_crop": {"enable": True, "size": SIZE, "scale": [0.25, 1.0],
                                                   "interpolation": interpolation},
                           "random_horizontal_flip": {"enable": True, "p": 0.5}, "to_tensor": {"enable": True},
                           "normalize": {"enable": True, "mean": list(MLDR_MEAN), "std": list(MLDR_STD)}}
    if erase:
        aug["random_erase"] = {"enable": True, "p": 0.5}
    if mix == "mixup":
        aug["mixup"] = {"enable": True, "alpha": 1.0, "div_by": 2.0, "p": 0.7}
    elif mix == "cutmix":
        aug["cutmix"] = {"enable": True, "alpha": 1.0, "p": 0.7}
    return {"reinforce": {"num_samples": views, "topk": k, "image_augmentation": aug, "compress": True,
                          "num_candidates": None, "joblib": False, "gzip": False},
            "teacher": {"timm_ensemble": True, "name": "tiny-ensemble"}, "dataset": "imagenet"}


def names_of(config: dict[str, Any]) -> list[str]:
    """The names ``dr.transforms.compose_from_config`` composes: ``clean_config`` drops ``enable: false``
    entries, then ``TRANSFORMATION_TO_NAME``'s order; other names are ignored, as ml-dr ignores them."""
    aug = config["reinforce"]["image_augmentation"]
    return [n for n in MLDR_NAMES if n in aug and dict(aug[n] or {}).get("enable", True)]


def cut_box(size: int, lam: float) -> tuple[Any, Any, Any, Any]:
    """``transforms.py`` ``CutMix.rand_bbox`` for an output of size x size: NumPy int64 values, as ml-dr stores."""
    h = w = size
    cut_rat = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut_rat), int(w * cut_rat)
    cx, cy = np.random.randint(h), np.random.randint(w)
    return (np.clip(cx - cut_h // 2, 0, h), np.clip(cy - cut_w // 2, 0, w),
            np.clip(cx + cut_h // 2, 0, h), np.clip(cy + cut_w // 2, 0, w))


def compress(params: dict[str, Any], names: list[str]) -> list[Any]:
    """``dr.transforms.Compose.compress`` (every per-image transform's ``compress_params`` is the identity for the
    transforms used here)."""
    out: list[Any] = []
    no_pair = True
    if "mixup" in names or "cutmix" in names:
        if params.get("mixup") is not None or params.get("cutmix") is not None:
            out.append(params["id2"])
            no_pair = False
        else:
            out.append(None)
    for name in names:
        p = params[name]  # a KeyError for a missing name, as in ml-dr
        if name in MLDR_NO_PARAM:
            continue
        if name == "mixup":
            out.append(p)
        elif name == "cutmix":
            out.append(None if p is None else [p[0], *p[1]])
        else:
            out.append(p[0] if no_pair else [p[0], p[1]])
    return out


def write_mldr(folder: Path, src: Path, mix: str | None = None, erase: bool = False, views: int = 3, k: int = 3,
               compressed: bool = True, seed: int = 0, interpolation: int = 2) -> dict[str, Any]:
    """A reinforcement of ``folder``'s train split as ``reinforce.py`` writes it (``transform_batch``: the dict of
    every composed name, ``(NO_PARAM, NO_PARAM)`` for the parameterless ones, then the crops, ``id2`` whenever a
    mixing transform is configured; ``reinforce``: one ``torch.save`` per sample, protocol 4). The partner is any
    sample (ml-dr draws it within the batch, which does not change the format). Returns the config."""
    config = mldr_config(mix, erase, views, k, interpolation)
    config["reinforce"]["compress"] = compressed
    names = names_of(config)
    ds = torchvision.datasets.ImageFolder(str(folder / "train"))
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    src.mkdir(parents=True)
    aug = config["reinforce"]["image_augmentation"]
    crop = T.RandomResizedCrop(SIZE, scale=tuple(aug["random_resized_crop"]["scale"]))
    eraser = T.RandomErasing(p=1.0)
    for t in range(len(ds)):
        entries = []
        for _ in range(views):
            id2 = random.randint(0, len(ds) - 1)
            pair = [ds[t][0], ds[id2][0]]
            params: dict[str, Any] = {"uint8": ((), ()),
                                      "random_horizontal_flip": tuple(torch.rand(1).item() < 0.5 for _ in pair),
                                      "to_tensor": ((), ()), "normalize": ((), ())}
            if erase:
                params["random_erase"] = tuple(
                    None if torch.rand(1) > aug["random_erase"]["p"] else
                    tuple(int(v) for v in eraser.get_params(torch.zeros(3, SIZE, SIZE), scale=eraser.scale,
                                                            ratio=eraser.ratio, value=[0])[:4]) for _ in pair)
            if mix:
                on = not torch.rand(1) > aug[mix]["p"]
                lam = float(np.random.beta(1.0, 1.0)) if on else None
                if mix == "mixup":
                    params[mix] = lam / aug["mixup"]["div_by"] if on else None
                else:
                    params[mix] = (lam, cut_box(SIZE, lam)) if on else None
            params["random_resized_crop"] = tuple(tuple(crop.get_params(im, crop.scale, crop.ratio)) for im in pair)
            if mix:
                params["id2"] = id2  # transform_batch sets it whenever a mixing transform is configured
            probs = torch.softmax(torch.randn(len(CLASSES)) * 3, 0).numpy()
            ids = np.argpartition(probs, -k)[-k:]  # dr.utils.sparsify
            entries.append({"params": compress(params, names) if compressed else params,
                            "prob": (probs[ids].tolist(), ids.tolist())})
        torch.save((t, entries), src / f"{t}.pth.tar", pickle_protocol=4)
    torch.save(config, src / "config.pth.tar")
    return config


def decompress(params: Any, names: list[str]) -> dict[str, Any]:
    """``dr.transforms.Compose.decompress``, as ``ReinforcedDataset`` calls it (only for a list)."""
    if not isinstance(params, list):
        return params
    out: dict[str, Any] = {}
    no_pair = None
    if "mixup" in names or "cutmix" in names:
        no_pair = params[0]
        if no_pair is not None:
            out["id2"] = no_pair
        params = params[1:]
    for p, name in zip(params, [n for n in names if n not in MLDR_NO_PARAM]):
        if p is None:
            continue
        if name in ("mixup", "cutmix"):
            out[name] = p if name == "mixup" else (p[0], tuple(p[1:]))
        elif no_pair is not None and len(p) > 1:
            out[name] = (p[0], p[1])
        else:
            out[name] = (p,)
    for name in names:  # "Fill non-random transformations"
        if name in MLDR_NO_PARAM:
            out[name] = ((), ())
    return out


def _reapply_one(name: str, x: Any, p: Any, aug: dict[str, Any]) -> Any:
    """One per-image transform of ``Compose.reapply`` on image ``x`` with its param ``p``."""
    if name == "uint8":
        return (x * 255).to(torch.uint8) if isinstance(x, torch.Tensor) else x  # ToUint8: a PIL image is kept
    if name == "random_resized_crop":
        cfg = aug[name]
        size = cfg["size"] if isinstance(cfg["size"], (list, tuple)) else [cfg["size"], cfg["size"]]
        mode = F._interpolation_modes_from_int(cfg.get("interpolation", 2))
        return F.resized_crop(x, *p, list(size), interpolation=mode, antialias=True)
    if name == "random_horizontal_flip":
        return F.hflip(x) if p else x
    if name == "to_tensor":
        return F.to_tensor(x) if not isinstance(x, torch.Tensor) else (x / 255.0).to(torch.float32)
    if name == "random_erase":
        ex, ey, eh, ew = p
        if ex != -1:
            x[:, ex:ex + eh, ey:ey + ew] = 0  # value ignored: always zero
        return x
    if name == "normalize":
        return T.Normalize(aug[name]["mean"], aug[name]["std"])(x)
    raise NotImplementedError(f"ml-dr transform {name} is not transcribed here")


def mldr_view(folder: Path, src: Path, index: int, view: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The view ml-dr's ``ReinforcedDataset.__getitem__`` (dr/data.py) gives for (index, view) — normalised and
    mixed, as its student trains on it — and the stored entry: ImageFolder's PIL images through
    ``Compose.reapply``, which runs a composed transform only when the params name it, per image only when its
    slot is not None. A view that never became a tensor fails as the real ``img.detach()`` does."""
    config = torch.load(src / "config.pth.tar", weights_only=False)  # ml-dr: torch.load's default
    names, aug = names_of(config), config["reinforce"]["image_augmentation"]
    ds = torchvision.datasets.ImageFolder(str(folder / "train"))
    stored = torch.load(src / f"{index}.pth.tar", weights_only=False)
    assert stored[0] == index
    entry = stored[1][view]
    params = decompress(entry["params"], names)
    images = [ds[index][0], ds[params["id2"]][0] if ("cutmix" in params or "mixup" in params) else None]
    for name in names:
        if name not in params:
            continue
        if name in ("mixup", "cutmix"):
            if params[name] is None:
                continue
            x, x2 = images
            if name == "mixup":
                images[0] = params[name] * x + (1 - params[name]) * x2
            else:
                _, (b1, c1, b2, c2) = params[name]
                images[0] = x.clone()
                images[0][:, b1:b2, c1:c2] = x2[:, b1:b2, c1:c2]
            continue
        for slot in (0, 1):
            if images[slot] is not None and params[name][slot] is not None:
                images[slot] = _reapply_one(name, images[slot], params[name][slot], aug)
    if not isinstance(images[0], torch.Tensor):
        raise AttributeError(f"'{type(images[0]).__name__}' object has no attribute 'detach'")
    return images[0], entry


def mldr_pixels(folder: Path, src: Path, index: int, view: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`mldr_view` with its Normalize undone: [0, 1] floats, to compare with an un-normalised replay."""
    config = torch.load(src / "config.pth.tar", weights_only=False)
    norm = config["reinforce"]["image_augmentation"]["normalize"]
    x, entry = mldr_view(folder, src, index, view)
    mean, std = (torch.tensor(norm[key], dtype=torch.float32).view(-1, 1, 1) for key in ("mean", "std"))
    return x * std + mean, entry


def mldr_densify(prob: Any, num_classes: int, method: str = "smooth") -> torch.Tensor:
    """``dr.utils.densify``: a dense target as it is; top-k probabilities whose float32 sum exceeds 1 (or
    ``method`` zeros) as the softmax of the probabilities, else the missing mass spread over the rest."""
    if not isinstance(prob, (list, tuple)):
        return torch.tensor(prob)
    sp, ids = torch.tensor(prob[0]), prob[1]
    r = 1.0 - sp.sum()
    if method == "zeros" or r < 0.0:
        p = torch.zeros(num_classes)
        p[ids] = torch.nn.functional.softmax(sp, dim=0)
    else:
        p = torch.ones(num_classes) * r / (num_classes - len(sp))
        p[ids] = sp
    return p


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
