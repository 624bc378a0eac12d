"""Random-resized-crop, horizontal flip and random erasing, with boxes in normalised coordinates.

A box is (x0, y0, w, h) as fractions of the image width and height, so the same stored box
crops the same region from the image at any resolution. Params are sampled without looking at
the image, so "area" and "aspect ratio" are measured in these normalised units: on a W x H
image a box of normalised ratio r = w/h has pixel aspect r * W/H (equal on square images).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as pil_functional
from torchvision.transforms.v2 import functional as F

from kdcache.augment.op import (
    BOX_SCALE,
    ERASE,
    PASSES,
    Fields,
    Op,
    box_row,
    check_range,
    from_pil,
    outside,
    pil_resize,
    pixel_span,
    quantise_box,
    to_pil,
    unit_boxes,
)
from kdcache.augment.rng import Draws
from kdcache.errors import InvalidSpec

TRIES = 10  # attempts before falling back, as in torchvision


def _sample_box(u: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float], strict: bool):
    """First of TRIES (area, log-ratio) draws whose box fits; returns (w, h, found) per element.

    ``u`` holds 2*TRIES uniforms per element. Width is sqrt(area*ratio), height sqrt(area/ratio).
    """
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0 : 2 * TRIES : 2]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = np.exp(log_lo + (log_hi - log_lo) * u[:, 1 : 2 * TRIES : 2])
    w, h = np.sqrt(area * r), np.sqrt(area / r)
    fits = (w < 1) & (h < 1) if strict else (w <= 1) & (h <= 1)
    first = fits.argmax(axis=1)
    rows = np.arange(len(first))
    return w[rows, first], h[rows, first], fits.any(axis=1)


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(Op):
    """Crop a random box and resize it to ``size`` x ``size`` (antialiased bilinear), like torchvision.

    The box is stored as uint16 fixed point (see ``quantise_box``): 8 bytes at steps of 1/65535 of
    the side, below a pixel of any image up to 65 535 px, where four float32 spent 16 bytes on low
    mantissa bits that do not compress. Sampling quantises and replay reads only the stored
    integers, so teacher and student crop the very same pixels.
    """

    name = "rrc"
    sizes = True
    usage = "rrc[:min_scale[:max_scale]], e.g. rrc:0.35"
    version = 2  # 2: the box is uint16 fixed point, q / 65535 (version 1 stored four float32)
    args = ("min_scale", "max_scale")
    min_scale: float = 0.08
    max_scale: float = 1.0
    min_ratio: float = 3 / 4
    max_ratio: float = 4 / 3

    def __post_init__(self) -> None:
        check_range("rrc", "min_scale", self.min_scale, 0.0, 1.0, self.usage, open_low=True)
        check_range("rrc", "max_scale", self.max_scale, self.min_scale, 1.0, self.usage)
        check_range("rrc", "min_ratio", self.min_ratio, 0.0, math.inf, self.usage, open_low=True)
        check_range("rrc", "max_ratio", self.max_ratio, self.min_ratio, math.inf, self.usage)

    def fields(self) -> Fields:
        return {"rrc": ((4,), "uint16")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        box = np.asarray(params[prefix + "rrc"], dtype=np.int64)
        return outside(prefix + "rrc (w, h)", box[..., 2:], 1, BOX_SCALE) \
            or outside(prefix + "rrc (x0 + w, y0 + h)", box[..., :2] + box[..., 2:], 1, BOX_SCALE)

    def sample(self, draws: Draws) -> dict[str, np.ndarray]:
        u = draws.uniform(2 * TRIES + 2)
        scale, ratio = (self.min_scale, self.max_scale), (self.min_ratio, self.max_ratio)
        w, h, found = _sample_box(u, scale, ratio, strict=False)
        # Fallback: the largest centred box whose ratio is in range (the whole image when 1 is).
        fw, fh = min(1.0, self.max_ratio), min(1.0, 1.0 / self.min_ratio)
        w, h = np.where(found, w, fw), np.where(found, h, fh)
        x0 = np.where(found, u[:, -2] * (1 - w), (1 - fw) / 2)
        y0 = np.where(found, u[:, -1] * (1 - h), (1 - fh) / 2)
        return {"rrc": quantise_box(x0, y0, w, h)}

    def apply(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        return self.crop(image, row, size, F.InterpolationMode.BILINEAR)

    @staticmethod
    def pixels(image: torch.Tensor | Image.Image, row: Mapping[str, np.ndarray]) -> tuple[int, int, int, int]:
        """(top, left, height, width) in pixels of the stored box on ``image`` (a tensor or a PIL image)."""
        rows, cols = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[-2:]
        x0, y0, w, h = box_row(row, "rrc")
        left, width = pixel_span(x0, w, cols, 1)
        top, height = pixel_span(y0, h, rows, 1)
        return top, left, height, width

    def crop(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int,
             interpolation: F.InterpolationMode) -> torch.Tensor:
        """:meth:`apply` with the resize's interpolation chosen (the model's own)."""
        top, left, height, width = self.pixels(image, row)
        return F.resized_crop(image, top, left, height, width, [size, size], interpolation=interpolation,
                              antialias=True)


@dataclasses.dataclass(frozen=True)
class PilResizedCrop(RandomResizedCrop):
    """``rrc`` whose crop is resized by Pillow, as torchvision's transforms do to a PIL image.

    The same box, sampled and stored the same way; only the resampling differs from ``rrc`` (Pillow's
    and torch's antialiased kernels round differently, by up to 2 levels of 255). Pipelines that crop
    PIL images (ml-dr's, TinyViT's) rendered their teachers' views this way, so a cache imported from
    them replays those very pixels (docs/interop.md).
    """

    name = "pilrrc"
    usage = "pilrrc[:min_scale[:max_scale[:passes]]], e.g. pilrrc:0.35 (passes 2: Pillow 9.5-12.2's resize order)"
    version = 1
    args = ("min_scale", "max_scale", "passes")
    compat = {"passes": 1}  # before passes: one Image.resize
    passes: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.passes not in PASSES:
            raise InvalidSpec(f"pilrrc passes must be 1 or 2, got {self.passes} — use {self.usage}")

    def crop(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int,
             interpolation: F.InterpolationMode) -> torch.Tensor:
        return from_pil(self.crop_pil(image, row, size, interpolation))

    def crop_pil(self, image: torch.Tensor | Image.Image, row: Mapping[str, np.ndarray], size: int,
                 interpolation: F.InterpolationMode) -> Image.Image:
        """:meth:`crop` as a PIL image, from a tensor (only the crop is converted) or a PIL image."""
        top, left, height, width = self.pixels(image, row)
        if isinstance(image, Image.Image):
            crop = image.crop((left, top, left + width, top + height))
        else:
            crop = to_pil(image[:, top : top + height, left : left + width])  # as PIL's crop: a copy of those pixels
        return pil_resize(crop, (size, size), pil_functional.pil_modes_mapping[interpolation], self.passes)


@dataclasses.dataclass(frozen=True)
class HorizontalFlip(Op):
    """Mirror left-right with probability p."""

    name = "flip"
    pil = True
    usage = "flip[:p], e.g. flip or flip:0.5"
    args = ("p",)
    p: float = 0.5

    def __post_init__(self) -> None:
        check_range("flip", "p", self.p, 0.0, 1.0, self.usage)

    def fields(self) -> Fields:
        return {"flip": ((), "uint8")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        return outside(prefix + "flip", params[prefix + "flip"], 0, 1)

    def sample(self, draws: Draws) -> dict[str, np.ndarray]:
        return {"flip": (draws.uniform(1)[:, 0] < self.p).astype(np.uint8)}

    def apply(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        return F.horizontal_flip(image) if int(np.asarray(row["flip"])) else image

    def apply_pil(self, image: Image.Image, row: Mapping[str, np.ndarray], size: int) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if int(np.asarray(row["flip"])) else image


@dataclasses.dataclass(frozen=True)
class RandomErasing(Op):
    """With probability p, set a random box to 0 (black) in every channel, like torchvision's RandomErasing."""

    name = "erase"
    usage = "erase[:p], e.g. erase:0.25"
    stage = ERASE
    args = ("p",)
    p: float = 0.25
    min_scale: float = 0.02
    max_scale: float = 0.33
    min_ratio: float = 0.3
    max_ratio: float = 3.3

    def __post_init__(self) -> None:
        check_range("erase", "p", self.p, 0.0, 1.0, self.usage)
        check_range("erase", "min_scale", self.min_scale, 0.0, 1.0, self.usage, open_low=True)
        check_range("erase", "max_scale", self.max_scale, self.min_scale, 1.0, self.usage)
        check_range("erase", "min_ratio", self.min_ratio, 0.0, math.inf, self.usage, open_low=True)
        check_range("erase", "max_ratio", self.max_ratio, self.min_ratio, math.inf, self.usage)

    def fields(self) -> Fields:
        return {"erase": ((4,), "float32")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        return unit_boxes(prefix + "erase", params[prefix + "erase"])

    def sample(self, draws: Draws) -> dict[str, np.ndarray]:
        u = draws.uniform(2 * TRIES + 3)
        # torchvision draws the ratio as h/w; ours is w/h, so swap the returned sides.
        scale, ratio = (self.min_scale, self.max_scale), (self.min_ratio, self.max_ratio)
        h, w, found = _sample_box(u[:, 1:], scale, ratio, strict=True)
        on = found & (u[:, 0] < self.p)
        box = np.stack([u[:, -2] * (1 - w), u[:, -1] * (1 - h), w, h], axis=1)
        return {"erase": np.where(on[:, None], box, 0.0).astype(np.float32)}

    def apply(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        x0, y0, w, h = box_row(row, "erase")
        left, width = pixel_span(x0, w, image.shape[-1], 0)
        top, height = pixel_span(y0, h, image.shape[-2], 0)
        if width == 0 or height == 0:
            return image
        image = image.clone()
        image[..., top : top + height, left : left + width] = 0
        return image
