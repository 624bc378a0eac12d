"""Ops that replay timm-style augmentation (TinyViT's copy of timm's, at Cream 4a13c40) from recorded numbers:
RandAugment's ops on the PIL image with their final arguments, and random erasing whose noise is drawn from a
recorded seed in the normalised space the teacher's input lived in.

``timmra`` stores per view ``num_ops`` rows of (op index, argument): the ops of timm's ``_RAND_TRANSFORMS``
order (``OPS``), each the PIL call timm's ``auto_augment.py`` makes with that argument (fill colour and resample
fixed per recipe), -1 for an op skipped. ``noiseerase`` stores per box (top, left, height, width, noise seed)
in pixels of the view; the noise is ``Generator(MT19937(seed)).normal`` of the box's shape ('pixel' mode) or of
one value per channel ('rand'), zeros in 'const' mode, written in normalised space and mapped back to [0, 1]
with the recipe's mean and std so that the student's normalisation gives it back (to float32 rounding).
Both replay imported numbers only: the arguments depend on draws made on the image at that step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms.v2 import functional as F

from kdcache.augment.mixing import MixOp
from kdcache.augment.op import ERASE, MAX_SIDE, Fields, Op, check_range, outside
from kdcache.errors import InvalidSpec

OPS = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
ENHANCERS = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast, "brightness": ImageEnhance.Brightness,
             "sharpness": ImageEnhance.Sharpness}
MODES = ("const", "rand", "pixel")
#: The largest |argument| a recorded step may hold (degrees, factors, fractions, thresholds: all far below it).
MAX_ARGUMENT = 1e6
#: The fewest posterize bits a step may hold: RandAugment's increasing posterize goes below 0 with ``mmax`` above
#: 10 (all bits cleared, as at 0); its mask of 2**(8 - bits) costs nothing at this bound, and hangs at -1e9.
MAX_BITS = 1000


def _lut(image: Image.Image, table: list[int]) -> Image.Image:
    return image.point(table * len(image.getbands()))


def apply_timm_op(image: Image.Image, op: str, arg: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    """One op as timm's ``auto_augment.py`` calls Pillow. Posterize is its mask table (what
    ``ImageOps.posterize`` applies; for 0 bits too, which Pillow 13 refuses and Pillow up to 12.2 turns black)."""
    affine = {"resample": resample, "fillcolor": fill}
    if op == "autocontrast":
        return ImageOps.autocontrast(image)
    if op == "equalize":
        return ImageOps.equalize(image)
    if op == "invert":
        return ImageOps.invert(image)
    if op == "rotate":
        return image.rotate(arg, **affine)
    if op == "posterize":
        bits = int(arg)
        return image if bits >= 8 else _lut(image, [i & ~(2 ** (8 - bits) - 1) for i in range(256)])
    if op == "solarize":
        return ImageOps.solarize(image, arg)
    if op == "solarize_add":
        add = int(arg)
        return _lut(image, [min(255, i + add) if i < 128 else i for i in range(256)])
    if op in ENHANCERS:
        return ENHANCERS[op](image).enhance(arg)
    matrix = {"shear_x": (1, arg, 0, 0, 1, 0), "shear_y": (1, 0, 0, arg, 1, 0),
              "translate_x": (1, 0, arg * image.size[0], 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, arg * image.size[1])}
    return image.transform(image.size, Image.AFFINE, matrix[op], **affine)


def check_side(op: Op, size: int) -> None:
    """InvalidSpec unless ``size`` is the view side ``op``'s pixel boxes were recorded at."""
    side = getattr(op, "side", 0)
    if side and size != side:
        raise InvalidSpec(f"{op.name} replays boxes and noise recorded in pixels of {side} px views, not {size} px — "
                          f"render this cache's views at {side} px (train --size {side})")


@dataclasses.dataclass(frozen=True)
class TimmRandAugment(Op):
    """timm's RandAugment replayed on the PIL image from recorded (op index, argument) rows."""

    name = "timmra"
    pil = prefers_pil = True
    usage = "timmra[:num_ops] (replays imported RandAugment choices only)"
    sampled = False
    args = ("num_ops",)
    num_ops: int = 2
    fill_r: int = 124
    fill_g: int = 116
    fill_b: int = 104
    resample: int = 3  # PIL's code: bicubic

    def __post_init__(self) -> None:
        check_range("timmra", "num_ops", self.num_ops, 1, 16, self.usage)
        for key in ("fill_r", "fill_g", "fill_b"):
            check_range("timmra", key, getattr(self, key), 0, 255, self.usage)
        check_range("timmra", "resample", self.resample, 0, 5, self.usage)

    def fields(self) -> Fields:
        return {"timmra": ((self.num_ops, 2), "float64")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        name = prefix + "timmra"
        rows = np.asarray(params[name], dtype=np.float64)
        op, arg = rows[..., 0], rows[..., 1]
        posterize = op == OPS.index("posterize")
        return super().check_stored(params, num_samples, prefix) or outside(name + " op", op, -1, len(OPS) - 1) \
            or (f"aug/{name} holds op {op[op != np.round(op)][0].item()!r}, not an op index" if (op != np.round(op)).any()
                else None) \
            or outside(name + " argument", arg, -MAX_ARGUMENT, MAX_ARGUMENT) \
            or outside(name + " posterize bits", np.where(posterize, arg, 0), -MAX_BITS, 8)

    def apply_pil(self, image: Image.Image, row: Mapping[str, np.ndarray], size: int) -> Image.Image:
        fill = (self.fill_r, self.fill_g, self.fill_b)[: len(image.getbands())]
        for op, arg in np.asarray(row["timmra"], dtype=np.float64).reshape(-1, 2).tolist():
            if op >= 0:
                image = apply_timm_op(image, OPS[int(op)], arg, fill, self.resample)
        return image


@dataclasses.dataclass(frozen=True)
class NoiseErasing(Op):
    """Random erasing with seeded normal noise in normalised space (timm's ``RandomErasing`` as TinyViT draws it);
    renders the view as float32, so it comes last among the view's ops."""

    floats = True

    name = "noiseerase"
    usage = "noiseerase[:boxes] (replays imported erasing only)"
    stage = ERASE
    sampled = False
    args = ("boxes",)
    boxes: int = 1
    mode: int = 2  # MODES: 0 const, 1 rand, 2 pixel
    side: int = 0  # the view side its boxes are pixels of (0: any)
    mean_r: float = 0.485
    mean_g: float = 0.456
    mean_b: float = 0.406
    std_r: float = 0.229
    std_g: float = 0.224
    std_b: float = 0.225

    def __post_init__(self) -> None:
        check_range("noiseerase", "boxes", self.boxes, 1, 64, self.usage)
        check_range("noiseerase", "mode", self.mode, 0, len(MODES) - 1, self.usage)
        for key in ("mean_r", "mean_g", "mean_b"):
            check_range("noiseerase", key, getattr(self, key), 0.0, 1.0, self.usage)
        for key in ("std_r", "std_g", "std_b"):
            check_range("noiseerase", key, getattr(self, key), 1e-3, 10.0, self.usage)

    def fields(self) -> Fields:
        return {"noiseerase": ((self.boxes, 5), "int64")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        name = prefix + "noiseerase"
        box = np.asarray(params[name], dtype=np.int64)
        top, left, height, width, seed = (box[..., k] for k in range(5))
        side = self.side or MAX_SIDE
        on = (height > 0) & (width > 0)
        return outside(name + " (top, left, height, width)", box[..., :4], 0, side) \
            or outside(name + " (bottom, right)", np.where(on, np.maximum(top + height, left + width), 0), 0, side) \
            or outside(name + " seed", seed, -1 if self.mode == 0 else 0, 2**32 - 1)  # const mode draws none: -1

    def apply(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        check_side(self, size)
        view = F.to_dtype(image, torch.float32, scale=True)
        channels = view.shape[0]
        mean = torch.tensor((self.mean_r, self.mean_g, self.mean_b)[:channels], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor((self.std_r, self.std_g, self.std_b)[:channels], dtype=torch.float32).view(-1, 1, 1)
        for top, left, height, width, seed in np.asarray(row["noiseerase"], dtype=np.int64).reshape(-1, 5).tolist():
            if height <= 0 or width <= 0:
                continue
            shape = (channels, height, width) if self.mode == 2 else (channels, 1, 1)
            noise = np.zeros(shape) if self.mode == 0 else \
                np.random.Generator(np.random.MT19937(seed)).normal(size=shape)
            values = torch.from_numpy(noise).to(torch.float32)
            view[:, top:top + height, left:left + width] = values * std + mean
        return view


@dataclasses.dataclass(frozen=True)
class PairMix(MixOp):
    """TinyViT's pair2 mixing replayed: with its pair mate, either MixUp at the recorded weight (float64, as
    TinyViT's λ) or CutMix of the recorded pixel box (top, bottom, left, right of the view), never clamped (the
    views may hold erasing's noise). The stored λ is the own label's share, the box's corrected one for CutMix."""

    name = "pairmix"
    usage = "pairmix (replays imported TinyViT mixing only)"
    sampled = False
    alpha: float = 1.0
    p: float = 1.0
    side: int = 0  # the view side its CutMix boxes are pixels of (0: any)

    def fields(self) -> Fields:
        return {**super().fields(), "pairmix_weight": ((), "float64"), "pairmix_box": ((4,), "int64")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        box = np.asarray(params["pairmix_box"], dtype=np.int64)
        return super().check_stored(params, num_samples) \
            or outside("pairmix_weight", params["pairmix_weight"], 0.0, 1.0) \
            or outside("pairmix_box", box, 0, self.side or MAX_SIDE) \
            or outside("pairmix_box (bottom - top, right - left)", np.stack([box[..., 1] - box[..., 0],
                                                                             box[..., 3] - box[..., 2]]), 0, MAX_SIDE)

    def mix(self, own: torch.Tensor, other: torch.Tensor, row: Mapping[str, np.ndarray]) -> torch.Tensor:
        check_side(self, own.shape[-1])
        top, bottom, left, right = (int(v) for v in np.asarray(row["pairmix_box"]).reshape(4))
        if bottom > top and right > left:
            out = own.clone()
            out[:, top:bottom, left:right] = other[:, top:bottom, left:right]
            return out
        weight = float(np.asarray(row["pairmix_weight"]))
        return own * np.float32(weight) + other * np.float32(1.0 - weight)
