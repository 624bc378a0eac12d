"""Each model's own preprocessing: normalisation, input size, interpolation and evaluation crop.

A :class:`Preprocess` comes from a model's weights (torchvision ``weights.transforms()``, timm
``pretrained_cfg``, a Hugging Face image processor), else from the dataset's statistics, and a
``--norm`` / ``--teacher-norm`` value overrides its mean and std. Training views are rendered from
the stored params at the model's size and interpolation and normalised with its mean and std;
evaluation views resize the shorter side to ``size / crop_pct`` and center-crop ``size``, as
torchvision and timm do (see docs/teachers.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from kdcache.errors import InvalidSpec

if TYPE_CHECKING:
    import torch

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DEFAULT_CROP_PCT = 0.875
#: ``--norm`` presets: mean and std of RGB inputs in [0, 1] units.
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
DATASET = "dataset"
_NORM_HELP = f"use {DATASET}, {', '.join(PRESETS)} or explicit M,M,M/S,S,S"


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input; ``size`` None means "the caller's choice"."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT
    origin: str = DATASET  # where the record came from, for info and run.json

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidSpec(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if not 0 < self.crop_pct <= 1:
            raise InvalidSpec(f"crop_pct must lie in (0, 1], got {self.crop_pct}")
        if len(self.mean) != len(self.std) or not self.mean or any(s <= 0 for s in self.std):
            raise InvalidSpec(f"bad normalisation {list(self.mean)}/{list(self.std)} — {_NORM_HELP}")

    def at(self, size: int) -> Preprocess:
        """The same preprocessing at input size ``size``."""
        return replace(self, size=int(size))

    @property
    def resize_size(self) -> int:
        """Shorter side before the evaluation center crop: floor(size / crop_pct), as timm computes it
        (torchvision's resize_size when crop_pct = crop_size / resize_size)."""
        return int(math.floor(self.size / self.crop_pct + 1e-6))

    def to_manifest(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "input_size": self.size,
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any], origin: str = "cache") -> Preprocess:
        """The record in a cache's ``recipe`` (caches made before 0.2 lack interpolation and crop_pct)."""
        return cls(tuple(float(m) for m in d["mean"]), tuple(float(s) for s in d["std"]), int(d["input_size"]),
                   d.get("interpolation", "bilinear"), float(d.get("crop_pct", DEFAULT_CROP_PCT)), origin)


def parse_norm(text: str, channels: int | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``--norm`` value -> (mean, std), or None for ``dataset`` (the dataset's statistics); ``channels``
    None checks the syntax only."""
    value = "".join(str(text).split()).lower()
    if value == DATASET:
        return None
    if value in PRESETS:
        mean, std = PRESETS[value]
    else:
        head, sep, tail = value.partition("/")
        try:
            mean, std = tuple(float(v) for v in head.split(",")), tuple(float(v) for v in tail.split(","))
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidSpec(f"unknown normalisation {text!r} — {_NORM_HELP}")
        if len(mean) != len(std) or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise InvalidSpec(f"bad normalisation {text!r}: give as many finite means as positive stds — "
                              f"{_NORM_HELP}")
    if channels is not None and len(mean) != channels:
        raise InvalidSpec(f"normalisation {text!r} has {len(mean)} channels, the images have {channels} — "
                          f"{_NORM_HELP} with {channels} values each")
    return mean, std


def resolve(model: Preprocess | None, dataset_mean: tuple[float, ...], dataset_std: tuple[float, ...],
            channels: int, size: int, norm: str | None = None) -> Preprocess:
    """A model's preprocessing at ``size``: its weights' record (else the dataset's statistics), with
    mean and std replaced by ``norm`` when given."""
    base = model or Preprocess(tuple(dataset_mean), tuple(dataset_std))
    if norm is not None:
        stats = parse_norm(norm, channels)
        mean, std = stats if stats is not None else (tuple(dataset_mean), tuple(dataset_std))
        base = replace(base, mean=mean, std=std, origin=f"--norm {norm}")
    if len(base.mean) != channels:
        raise InvalidSpec(f"the model normalises {len(base.mean)} channels ({base.origin}), the images have "
                          f"{channels} — use a dataset with {len(base.mean)} channels, or pass a --norm")
    return base.at(size)


def interpolation_mode(name: str) -> Any:
    """torchvision's InterpolationMode for a name of :data:`INTERPOLATIONS`."""
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def eval_view(image: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Un-augmented evaluation input: uint8 [C,H,W] -> normalised float32 [C,size,size].

    Images larger than the input size are resized (shorter side to ``resize_size``, on a PIL image, as
    torchvision's and timm's evaluation transforms do with an ImageFolder) and center-cropped; smaller
    sources (MNIST, digits, CIFAR at their own size) are resized whole, antialiased, as before.
    """
    import torch
    from torchvision.transforms import functional as TF

    from kdcache.augment import resize_view

    if min(image.shape[-2:]) <= pre.size:
        view = resize_view(image, pre.size)
    else:
        pil = TF.to_pil_image(image)
        pil = TF.resize(pil, [pre.resize_size], interpolation=interpolation_mode(pre.interpolation), antialias=True)
        view = TF.convert_image_dtype(TF.pil_to_tensor(TF.center_crop(pil, [pre.size])), torch.float32)
    return TF.normalize(view, list(pre.mean), list(pre.std))
