"""A small ml-dr source written by ml-dr's rules, and the views its reader (and its writer) render.

Nothing here imports kdcache: each function is a transcription of apple/ml-dr a21113c (whose code files equal
c72c884), named where it follows it: ``reinforce.py`` (``main``, ``transform_batch``, ``reinforce``),
``dr/transforms.py`` (``clean_config``, ``compose_from_config``, ``Compose.compress``/``decompress``/``reapply``
and each transform's ``forward``), ``transforms.py`` (``MixUp``, ``CutMix.rand_bbox``), ``dr/utils.py``
(``sparsify``, ``densify``), ``dr/data.py`` (``ReinforcedDataset.__getitem__``). Checked against that code,
run unchanged (docs/interop.md, "Checked against the real code").
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from source_folder import CLASSES, SIZE
from torchvision import transforms as T
from torchvision.transforms import functional as F

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
    """``dr.transforms.Compose.compress``: per transform ``compress_params``, the identity but for RandAugment's
    (an op's index in ``op_names`` for its name)."""
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
            one = _compress_ra if name == "rand_augment" else (lambda v: v)
            out.append(one(p[0]) if no_pair else [one(p[0]), one(p[1])])
    return out


RA_OP_NAMES = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
               "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]  # dr/transforms.py RandAugment.op_names


def _compress_ra(p: Any) -> Any:
    """``RandAugment.compress_params``."""
    return None if p is None else [(RA_OP_NAMES.index(name), m) for name, m in p]


def _decompress_ra(p: Any) -> Any:
    """``RandAugment.decompress_params``."""
    return None if p is None else [(RA_OP_NAMES[i], m) for i, m in p]


class _PresetCrop(T.RandomCrop):
    """``dr/transforms.py`` ``RandomCrop``: torchvision's, with ``get_params`` returning preset ``(top, left, h, w)``."""

    def __init__(self, params: tuple[int, int, int, int] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params = params

    def get_params(self, img: Any, output_size: Any) -> tuple[int, int, int, int]:
        if self.params is None:
            self.params = super().get_params(img, output_size)
        return self.params


def _crop_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "enable"}


def _draw(name: str, x: Any, aug: dict[str, Any]) -> Any:
    """The random params ml-dr's transform ``name`` draws for image ``x`` (its ``forward`` with ``params=None``)."""
    cfg = aug[name]
    if name == "resize":  # Resize returns self.size; transform_batch collates it (a list stays a list)
        return tuple(cfg["size"]) if isinstance(cfg["size"], (list, tuple)) else cfg["size"]
    if name == "random_crop":
        crop = _PresetCrop(None, **_crop_kwargs(cfg))
        crop(x)
        return crop.params[:2]
    if name == "random_resized_crop":
        crop = T.RandomResizedCrop(cfg["size"], scale=tuple(cfg.get("scale", (0.08, 1.0))))
        return tuple(crop.get_params(x, crop.scale, crop.ratio))
    if name == "random_horizontal_flip":
        return torch.rand(1).item() < cfg.get("p", 0.5)
    if name == "rand_augment":
        ra = T.RandAugment(num_ops=cfg.get("num_ops", 2))
        width, height = x.size
        op_meta = ra._augmentation_space(ra.num_magnitude_bins, (height, width))
        if torch.rand(1) > cfg.get("p", 1.0):
            return None
        params = []
        for _ in range(ra.num_ops):
            op_name = list(op_meta.keys())[int(torch.randint(len(op_meta), (1,)).item())]
            magnitudes, signed = op_meta[op_name]
            magnitude = float(magnitudes[ra.magnitude].item()) if magnitudes.ndim > 0 else 0.0
            if signed and torch.randint(2, (1,)):
                magnitude *= -1.0
            params.append((op_name, magnitude))
        return params
    if name == "random_erase":
        eraser = T.RandomErasing(p=1.0)
        if torch.rand(1) > cfg.get("p", 0.5):
            return None
        width, height = x.size
        return tuple(int(v) for v in eraser.get_params(torch.zeros(3, height, width), scale=eraser.scale,
                                                       ratio=eraser.ratio, value=[0])[:4])
    raise NotImplementedError(name)


def write_mldr(folder: Path, src: Path, mix: str | None = None, erase: bool = False, views: int = 3, k: int = 3,
               compressed: bool = True, seed: int = 0, interpolation: int = 2,
               aug: dict[str, Any] | None = None) -> dict[str, Any]:
    """A reinforcement of ``folder``'s train split as ``reinforce.py`` writes it (``transform_batch``: the dict of
    every composed name, ``(NO_PARAM, NO_PARAM)`` for the parameterless ones, each transform's params drawn on
    the image at its point of the chain, ``id2`` whenever a mixing transform is configured; ``reinforce``: one
    ``torch.save`` per sample, protocol 4). ``aug`` replaces ``image_augmentation`` (any of ml-dr's transforms).
    The partner is any sample (ml-dr draws it within the batch, which does not change the format)."""
    config = mldr_config(mix, erase, views, k, interpolation)
    if aug is not None:
        config["reinforce"]["image_augmentation"] = aug
    config["reinforce"]["compress"] = compressed
    names = names_of(config)
    ds = torchvision.datasets.ImageFolder(str(folder / "train"))
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    src.mkdir(parents=True)
    aug = config["reinforce"]["image_augmentation"]
    mixes = [name for name in ("mixup", "cutmix") if name in names]
    for t in range(len(ds)):
        entries = []
        for _ in range(views):
            id2 = random.randint(0, len(ds) - 1)
            pair = [ds[t][0], ds[id2][0]]
            params: dict[str, Any] = {name: ((), ()) for name in names if name in MLDR_NO_PARAM}
            for name in names:
                if name in MLDR_NO_PARAM or name in mixes:
                    continue
                drawn = []
                for slot in (0, 1):
                    drawn.append(_draw(name, pair[slot], aug))
                    if name in ("resize", "random_crop", "random_resized_crop", "center_crop"):
                        pair[slot] = _reapply_one(name, pair[slot], drawn[-1], aug)
                params[name] = tuple(drawn)
            for name in mixes:
                on = not torch.rand(1) > aug[name]["p"]
                lam = float(np.random.beta(1.0, 1.0)) if on else None
                side = pair[0].size[1]
                if name == "mixup":
                    params[name] = lam / aug["mixup"].get("div_by", 1.0) if on else None
                else:
                    params[name] = (lam, cut_box(side, lam)) if on else None
            if mixes:
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
            one = _decompress_ra if name == "rand_augment" else (lambda v: v)
            out[name] = (one(p[0]), one(p[1]))
        else:
            out[name] = (_decompress_ra(p) if name == "rand_augment" else p,)
    for name in names:  # "Fill non-random transformations"
        if name in MLDR_NO_PARAM:
            out[name] = ((), ())
    return out


def _reapply_one(name: str, x: Any, p: Any, aug: dict[str, Any]) -> Any:
    """One per-image transform of ``Compose.reapply`` on image ``x`` with its param ``p``."""
    if name == "uint8":
        return (x * 255).to(torch.uint8) if isinstance(x, torch.Tensor) else x  # ToUint8: a PIL image is kept
    if name == "resize":  # Resize ignores its params
        cfg = _crop_kwargs(aug[name])
        if isinstance(cfg.get("interpolation"), int):
            cfg["interpolation"] = F._interpolation_modes_from_int(cfg["interpolation"])
        return T.Resize(**cfg)(x)
    if name == "center_crop":  # CenterCrop.forward: super().forward(img).contiguous(), on PIL images too
        return T.CenterCrop(aug[name]["size"])(x).contiguous()
    if name == "random_crop":
        size = aug[name]["size"]
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return _PresetCrop((p[0], p[1], size[0], size[1]), **_crop_kwargs(aug[name]))(x)
    if name == "rand_augment":
        from torchvision.transforms.autoaugment import _apply_op  # what ml-dr's RandAugment.forward calls

        for op_name, magnitude in p[: aug[name].get("num_ops", 2)]:
            x = _apply_op(x, op_name, magnitude, interpolation=T.InterpolationMode.NEAREST, fill=None)
        return x
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


BEFORE_COLLATE = ("uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "to_tensor")


def mldr_writer_pixels(folder: Path, src: Path, index: int, view: int) -> torch.Tensor:
    """The view (index, view) as ml-dr's writer rendered it for the teacher, un-normalised and unmixed:
    ``DatasetWithParameters`` runs the before-collate transforms on the PIL image, then ``transform_batch``
    runs the chain with ``after_collate`` on the collated float tensor: ``uint8`` makes it a uint8 tensor, so
    the flip and RandAugment run on that tensor (not on the PIL image, as the reader runs them)."""
    config = torch.load(src / "config.pth.tar", weights_only=False)
    names, aug = names_of(config), config["reinforce"]["image_augmentation"]
    params = decompress(torch.load(src / f"{index}.pth.tar", weights_only=False)[1][view]["params"], names)
    x = torchvision.datasets.ImageFolder(str(folder / "train"))[index][0]
    for after in (False, True):
        for name in names:
            if name in ("mixup", "cutmix", "normalize") or name not in params or params[name][0] is None:
                continue
            if (name in BEFORE_COLLATE) != after or (after and name in ("uint8", "to_tensor")):
                x = _reapply_one(name, x, params[name][0], aug)
    return x


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
