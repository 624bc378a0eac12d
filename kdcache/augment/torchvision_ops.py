"""Ops that call torchvision's (v1) transforms the way pipelines built on them render a view: a resize, a
centre crop, a padded random crop, and RandAugment from recorded (op, magnitude) pairs.

ml-dr (apple/ml-dr a21113c, ``dr/transforms.py``) runs its ``Resize``, ``CenterCrop`` and ``RandomCrop`` on
the PIL image and stores the crop's pixel offsets; its reader replays ``RandAugment`` on the PIL image from
the stored ``(op, signed magnitude)`` pairs while its writer, which fed the teacher, ran them on a uint8
tensor. The ops here make those same calls (``torchvision.transforms.functional``) on the same kind of
image, so an imported cache replays the very pixels (docs/interop.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from kdcache.augment.autoaugment import OPS as RA_OPS
from kdcache.augment.autoaugment import apply_op
from kdcache.augment.op import MAX_SIDE, PASSES, Fields, Op, check_range, outside, pil_resize
from kdcache.augment.rng import Draws
from kdcache.errors import CacheCorrupt, InvalidSpec

#: PIL's resampling codes, which torchvision's transforms also take, and the modes they name.
PIL_MODES = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC,
             1: InterpolationMode.LANCZOS, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}
#: torchvision's padding modes, in the order their codes name them.
PADDING_MODES = ("constant", "edge", "reflect", "symmetric")
NO_OP = -1  # a recorded RandAugment step that did not run (the transform was skipped for the view)


@dataclasses.dataclass(frozen=True)
class _Sized(Op):
    """An op without random params that gives the view ``height`` x ``width`` (0: see the subclass)."""

    sizes = True
    pil = prefers_pil = True
    args = ("height", "width")
    height: int = 224
    width: int = 0

    def __post_init__(self) -> None:
        check_range(self.name, "height", self.height, 1, MAX_SIDE, self.usage)
        check_range(self.name, "width", self.width, 0, MAX_SIDE, self.usage)

    def fields(self) -> Fields:
        return {}

    def sample(self, draws: Draws) -> dict[str, np.ndarray]:
        return {}


@dataclasses.dataclass(frozen=True)
class Resize(_Sized):
    """``torchvision.transforms.Resize`` on the PIL image: to ``height`` x ``width``, or (``width`` 0) the
    shorter side to ``height``, with PIL's resampling ``interpolation`` (code 2 bilinear, 3 bicubic)."""

    name = "resize"
    usage = ("resize:height[:width[:passes]], e.g. resize:224 (shorter side) or resize:224:224 (passes 2: Pillow "
             "9.5-12.2's order)")
    args = ("height", "width", "passes")
    passes: int = 1
    interpolation: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interpolation not in PIL_MODES:
            raise_mode("resize", self.interpolation, self.usage)
        if self.passes not in PASSES:
            raise InvalidSpec(f"resize passes must be 1 or 2, got {self.passes} — use {self.usage}")

    def apply_pil(self, image: Image.Image, row: Mapping[str, np.ndarray], size: int) -> Image.Image:
        return pil_resize(image, self.output_size(image.width, image.height), self.interpolation, self.passes)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: torchvision's rule, a shorter side keeps the aspect (truncated)."""
        if self.width:
            return self.width, self.height
        short, long = sorted((width, height))
        new_long = int(self.height * long / short)
        return (self.height, new_long) if width <= height else (new_long, self.height)


@dataclasses.dataclass(frozen=True)
class CenterCrop(_Sized):
    """``torchvision.transforms.CenterCrop``: the middle ``height`` x ``width`` (``width`` 0: square) pixels,
    padded with zeros where the image is smaller."""

    name = "centercrop"
    usage = "centercrop:height[:width], e.g. centercrop:224"

    def apply_pil(self, image: Image.Image, row: Mapping[str, np.ndarray], size: int) -> Image.Image:
        return TF.center_crop(image, [self.height, self.width or self.height])


@dataclasses.dataclass(frozen=True)
class PaddedCrop(_Sized):
    """``torchvision.transforms.RandomCrop`` replayed from its recorded offsets: pad every side by ``padding``
    (``fill`` and ``padding_mode`` as torchvision's codes), pad to the crop where ``pad_if_needed``, then crop
    ``height`` x ``width`` at the stored (top, left) of the padded image. CIFAR's classic augmentation."""

    name = "padcrop"
    usage = "padcrop:height[:padding], e.g. padcrop:32:4 (replays imported offsets only)"
    sampled = False
    args = ("height", "padding")
    height: int = 32
    padding: int = 0
    width: int = 0
    fill: int = 0
    padding_mode: int = 0
    pad_if_needed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("padcrop", "padding", self.padding, 0, MAX_SIDE, self.usage)
        check_range("padcrop", "fill", self.fill, 0, 255, self.usage)
        check_range("padcrop", "padding_mode", self.padding_mode, 0, len(PADDING_MODES) - 1, self.usage)
        check_range("padcrop", "pad_if_needed", self.pad_if_needed, 0, 1, self.usage)

    def fields(self) -> Fields:
        return {"padcrop": ((2,), "int32")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        return outside(prefix + "padcrop", params[prefix + "padcrop"], 0, 2 * (MAX_SIDE + self.padding))

    def apply_pil(self, image: Image.Image, row: Mapping[str, np.ndarray], size: int) -> Image.Image:
        top, left = (int(v) for v in np.asarray(row["padcrop"]).reshape(2))
        height, width = self.height, self.width or self.height
        mode = PADDING_MODES[self.padding_mode]
        pil = image
        if self.padding:
            pil = TF.pad(pil, self.padding, self.fill, mode)
        if self.pad_if_needed and pil.size[0] < width:
            pil = TF.pad(pil, [width - pil.size[0], 0], self.fill, mode)
        if self.pad_if_needed and pil.size[1] < height:
            pil = TF.pad(pil, [0, height - pil.size[1]], self.fill, mode)
        if not (0 <= top <= pil.size[1] - height and 0 <= left <= pil.size[0] - width):
            raise CacheCorrupt(f"padcrop offset ({top}, {left}) of a {height}x{width} crop lies outside the "
                               f"{pil.size[1]}x{pil.size[0]} padded image — the cache is damaged; import it again")
        return TF.crop(pil, top, left, height, width)


@dataclasses.dataclass(frozen=True)
class TensorRandAugment(Op):
    """torchvision's RandAugment replayed from recorded ``(op, signed magnitude)`` pairs on the uint8 tensor,
    as ``_apply_op`` of ``torchvision.transforms.autoaugment`` runs them (nearest, no fill).

    The field holds ``num_ops`` rows of (op id, magnitude) in float64, op ids in torchvision's order
    (``Identity`` 0 ... ``Equalize`` 13) and -1 where the transform was skipped. The magnitude is the value the
    op takes: pixels for a translate, degrees for rotate, the threshold for solarize.
    """

    name = "tvra"
    usage = "tvra[:num_ops] (replays imported RandAugment choices only)"
    sampled = False
    args = ("num_ops",)
    on_pil: ClassVar[bool] = False
    num_ops: int = 2

    def __post_init__(self) -> None:
        check_range(self.name, "num_ops", self.num_ops, 1, 16, self.usage)

    def fields(self) -> Fields:
        return {self.name: ((self.num_ops, 2), "float64")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        why = super().check_stored(params, num_samples, prefix)
        if why is not None:
            return why
        for op, magnitude in np.unique(np.asarray(params[prefix + self.name], dtype=np.float64).reshape(-1, 2),
                                       axis=0).tolist():
            why = check_randaugment_step(op, magnitude)
            if why is not None:
                return f"aug/{prefix}{self.name}: {why}"
        return None

    def apply(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        if self.on_pil:
            return super().apply(image, row, size)
        return self._steps(image, row)

    def apply_pil(self, image: Image.Image, row: Mapping[str, np.ndarray], size: int) -> Image.Image:
        return self._steps(image, row)

    def _steps(self, image: Any, row: Mapping[str, np.ndarray]) -> Any:
        for op, magnitude in np.asarray(row[self.name], dtype=np.float64).reshape(-1, 2).tolist():
            if int(op) != NO_OP:
                image = apply_op(image, RA_OPS[int(op)], magnitude, TF)
        return image


@dataclasses.dataclass(frozen=True)
class PilRandAugment(TensorRandAugment):
    """:class:`TensorRandAugment` on the PIL image, as torchvision's RandAugment runs on one (Pillow's
    geometry and enhancers; up to tens of levels from the tensor path, docs/interop.md)."""

    name = "pilra"
    usage = "pilra[:num_ops] (replays imported RandAugment choices only)"
    on_pil = True
    pil = prefers_pil = True


def check_randaugment_step(op: int, magnitude: float) -> str | None:
    """Why a recorded RandAugment step cannot be replayed (None when it can): an op id outside torchvision's
    14, a magnitude that is not finite, a negative enhance factor or a posterize of other than 0-8 bits."""
    if op != NO_OP and not (0 <= op < len(RA_OPS) and float(op).is_integer()):
        return f"op id {op} is not one of RandAugment's {len(RA_OPS)}"
    if not np.isfinite(magnitude) or abs(magnitude) > 1e6:
        return f"magnitude {magnitude!r} is not a finite number of a sensible size"
    name = RA_OPS[int(op)] if op != NO_OP else None
    if name in ("brightness", "color", "contrast", "sharpness") and 1.0 + magnitude < 0:
        return f"{name} factor 1 + {magnitude} is negative"
    if name == "posterize" and not (float(magnitude).is_integer() and 0 <= magnitude <= 8):
        return f"posterize to {magnitude} bits is not 0 to 8 bits"
    return None


def raise_mode(op: str, code: int, usage: str) -> None:
    codes = ", ".join(f"{c} {m.value}" for c, m in sorted(PIL_MODES.items()))
    raise InvalidSpec(f"{op} interpolation {code!r} is not a PIL resampling code ({codes}) — use {usage}")
