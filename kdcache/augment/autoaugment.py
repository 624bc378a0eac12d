"""TrivialAugmentWide and RandAugment with their choices stored as numbers.

Each applied op is stored as three uint8s: (op id, magnitude bin, negate). Replay looks the
magnitude up in the same 31-bin tables torchvision's v2 TrivialAugmentWide / RandAugment use
(computed at the image size the op runs at, which matters for RandAugment's translate) and calls
the same ``torchvision.transforms.v2.functional`` ops with nearest interpolation and fill 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kdcache.augment.op import Fields, Op, check_range, outside
from kdcache.augment.rng import Draws

NUM_BINS = 31
OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
    "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip
SIGNED = frozenset(OPS[1:10])  # shears, translates, rotate, brightness, color, contrast, sharpness
NO_MAGNITUDE = frozenset({"identity", "autocontrast", "equalize"})
_SIGNED_IDS = np.array([op in SIGNED for op in OPS])
_MAGNITUDE_IDS = np.array([op not in NO_MAGNITUDE for op in OPS])
_NEAREST = InterpolationMode.NEAREST


def magnitudes(op: str, wide: bool, height: int, width: int) -> torch.Tensor | None:
    """The 31 magnitude bins of ``op`` (TrivialAugmentWide when ``wide``, else RandAugment)."""
    if op in ("shear_x", "shear_y"):
        return torch.linspace(0.0, 0.99 if wide else 0.3, NUM_BINS)
    if op in ("translate_x", "translate_y"):
        extent = width if op == "translate_x" else height
        return torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * extent, NUM_BINS)
    if op == "rotate":
        return torch.linspace(0.0, 135.0 if wide else 30.0, NUM_BINS)
    if op in ("brightness", "color", "contrast", "sharpness"):
        return torch.linspace(0.0, 0.99 if wide else 0.9, NUM_BINS)
    if op == "posterize":
        return (8 - (torch.arange(NUM_BINS) / ((NUM_BINS - 1) / (6 if wide else 4)))).round().int()
    if op == "solarize":
        return torch.linspace(1.0, 0.0, NUM_BINS)
    return None


def apply_op(image: Any, op: str, magnitude: float, fn: ModuleType = F) -> Any:
    """One op on an image, exactly as torchvision's auto-augment transforms call ``fn``: v2's on a uint8
    tensor (the default), or v1's (``torchvision.transforms.functional``) on a tensor or PIL image, as v1's
    ``autoaugment._apply_op`` does. ``solarize``'s magnitude is the threshold in pixel levels."""
    if op in ("shear_x", "shear_y"):
        angle = math.degrees(math.atan(magnitude))
        shear = [angle, 0.0] if op == "shear_x" else [0.0, angle]
        return fn.affine(
            image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=_NEAREST, fill=None, center=[0, 0]
        )
    if op in ("translate_x", "translate_y"):
        shift = [int(magnitude), 0] if op == "translate_x" else [0, int(magnitude)]
        return fn.affine(
            image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=_NEAREST, fill=None
        )
    if op == "rotate":
        return fn.rotate(image, angle=magnitude, interpolation=_NEAREST, fill=None)
    if op == "brightness":
        return fn.adjust_brightness(image, brightness_factor=1.0 + magnitude)
    if op == "color":
        return fn.adjust_saturation(image, saturation_factor=1.0 + magnitude)
    if op == "contrast":
        return fn.adjust_contrast(image, contrast_factor=1.0 + magnitude)
    if op == "sharpness":
        return fn.adjust_sharpness(image, sharpness_factor=1.0 + magnitude)
    if op == "posterize":
        return fn.posterize(image, bits=int(magnitude))
    if op == "solarize":
        return fn.solarize(image, threshold=magnitude)
    if op == "autocontrast":
        return fn.autocontrast(image)
    if op == "equalize":
        return fn.equalize(image)
    return image


def _replay(image: torch.Tensor, choices: np.ndarray, wide: bool) -> torch.Tensor:
    for op_id, bin_, negate in np.asarray(choices, dtype=np.uint8).reshape(-1, 3).tolist():
        op = OPS[op_id]
        table = magnitudes(op, wide, image.shape[-2], image.shape[-1])
        magnitude = 0.0 if table is None else float(table[bin_])
        if op == "solarize":  # v2's table is a fraction of the largest level
            magnitude *= 255.0
        image = apply_op(image, op, -magnitude if negate else magnitude)
    return image


@dataclasses.dataclass(frozen=True)
class TrivialAugment(Op):
    """TrivialAugmentWide: one op from OPS, uniformly chosen, at a uniformly chosen magnitude bin."""

    name = "trivial"
    usage = "trivial (no arguments)"

    def fields(self) -> Fields:
        return {"trivial": ((3,), "uint8")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        return _steps(prefix + "trivial", params[prefix + "trivial"])

    def sample(self, draws: Draws) -> dict[str, np.ndarray]:
        u = draws.uniform(3)
        op = np.floor(u[:, 0] * len(OPS)).astype(np.int64)
        bin_ = np.where(_MAGNITUDE_IDS[op], np.floor(u[:, 1] * NUM_BINS), 0)
        negate = _SIGNED_IDS[op] & (u[:, 2] <= 0.5)
        return {"trivial": np.stack([op, bin_, negate], axis=1).astype(np.uint8)}

    def apply(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        return _replay(image, row["trivial"], wide=True)


@dataclasses.dataclass(frozen=True)
class RandAugment(Op):
    """RandAugment: ``num_ops`` ops chosen uniformly (with repeats), all at magnitude bin ``magnitude``."""

    name = "randaugment"
    usage = "randaugment[:num_ops[:magnitude]], e.g. randaugment:2:9 (magnitude 0-30)"
    args = ("num_ops", "magnitude")
    num_ops: int = 2
    magnitude: int = 9

    def __post_init__(self) -> None:
        check_range("randaugment", "num_ops", self.num_ops, 1, 16, self.usage)
        check_range("randaugment", "magnitude", self.magnitude, 0, NUM_BINS - 1, self.usage)

    def fields(self) -> Fields:
        return {"randaugment": ((self.num_ops, 3), "uint8")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        return _steps(prefix + "randaugment", params[prefix + "randaugment"])

    def sample(self, draws: Draws) -> dict[str, np.ndarray]:
        u = draws.uniform(2 * self.num_ops).reshape(-1, self.num_ops, 2)
        op = np.floor(u[..., 0] * len(OPS)).astype(np.int64)
        bin_ = np.where(_MAGNITUDE_IDS[op], self.magnitude, 0)
        negate = _SIGNED_IDS[op] & (u[..., 1] <= 0.5)
        return {"randaugment": np.stack([op, bin_, negate], axis=-1).astype(np.uint8)}

    def apply(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        return _replay(image, row["randaugment"], wide=False)


def _steps(name: str, rows: np.ndarray) -> str | None:
    """Stored (op, magnitude bin, negate) rows [..., 3] outside OPS, the bins or a flag, as a reason, or None."""
    rows = np.asarray(rows)
    return outside(name + " op", rows[..., 0], 0, len(OPS) - 1) or outside(name + " bin", rows[..., 1], 0, NUM_BINS - 1) \
        or outside(name + " negate", rows[..., 2], 0, 1)
