"""ml-dr's transforms as a kdcache recipe, and one view's stored params as the recipe's arrays.

Follows apple/ml-dr a21113c, ``dr/transforms.py``: ``compose_from_config`` composes the transforms of
``reinforce.image_augmentation`` in the order of ``TRANSFORMATION_TO_NAME`` (``ORDER``), drops those with
``enable: false`` and ignores names it does not know. Each transform it defines has an op that replays it
exactly: ``Resize``, ``RandomCrop`` and ``RandomResizedCrop`` on the PIL image, flip,
``RandAugment`` from its stored (op, signed magnitude) pairs, erasing, and MixUp then CutMix with one partner.
``CenterCrop`` is the exception: ml-dr's own fails on every image it is given, so no source holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kdcache.augment import Recipe
from kdcache.augment.geometry import HorizontalFlip, PilResizedCrop, RandomErasing
from kdcache.augment.mixing import CutMix, MixUp
from kdcache.augment.op import Op
from kdcache.augment.torchvision_ops import (
    NO_OP,
    PADDING_MODES,
    CenterCrop,
    PaddedCrop,
    PilRandAugment,
    Resize,
    TensorRandAugment,
    check_randaugment_step,
)
from kdcache.errors import DataCorrupt, InvalidSpec
from kdcache.interop.boxes import integers

#: ml-dr's transforms in the order it composes them (``dr.transforms.TRANSFORMATION_TO_NAME``).
ORDER = ("uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "random_horizontal_flip",
         "rand_augment", "to_tensor", "random_erase", "normalize", "mixup", "cutmix")
NO_PARAM = ("uint8", "center_crop", "to_tensor", "normalize")
#: ``dr.transforms.RandAugment.op_names``: torchvision's RandAugment ops, in the order compressed params index them.
RA_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
            "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
#: PIL's interpolation codes (what a config may give a crop or resize) and their names.
PIL_CODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_CODES = {name: code for code, name in PIL_CODES.items()}
MAX_SIDE = 8192  # a view's side in pixels
#: Where RandAugment is rendered: on the PIL image as ml-dr's reader (its student) renders it, or on the uint8
#: tensor as its writer rendered it for the teacher.
RENDERINGS = {"pil": PilRandAugment, "tensor": TensorRandAugment}


def transforms(config: Mapping[str, Any], where: str, notes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The transforms ml-dr composes from ``reinforce.image_augmentation``, in its order: ``enable: false`` drops
    one, as ``clean_config`` does, and a name it does not know is ignored, as ml-dr ignores it, with a line in
    ``notes``."""
    given = {name: dict(cfg or {}) for name, cfg in config["reinforce"]["image_augmentation"].items()}
    enabled = {name: cfg for name, cfg in given.items() if cfg.pop("enable", True)}
    for name in sorted(set(enabled) - set(ORDER)):
        if notes is not None:
            notes.append(f"{where}: ml-dr ignores {name!r}, which is not one of its transforms — so does this import")
        enabled.pop(name)
    return {name: enabled[name] for name in ORDER if name in enabled}


def _pair(value: Any, default: tuple[float, float]) -> tuple[float, float]:
    low, high = value if value is not None else default
    return float(low), float(high)


def _interpolation(value: Any, what: str, where: str) -> str:
    name = PIL_CODES.get(value, value) if not isinstance(value, str) else value.lower()
    if name not in _CODES:
        raise InvalidSpec(f"{where}: {what} interpolation {value!r} is not nearest, bilinear or bicubic")
    return name


def _side(value: Any, what: str, where: str, shorter: bool = False) -> tuple[int, int]:
    """A transform's ``size`` as (height, width); with ``shorter`` an int is (side, 0): the shorter side."""
    sides = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else [None]
    if len(sides) == 1 and not shorter:
        sides = sides * 2
    ok = 1 <= len(sides) <= 2 and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SIDE
                                      for s in sides)
    if not ok:
        raise InvalidSpec(f"{where}: {what} size {value!r} is not one or two sides from 1 to {MAX_SIDE} px")
    return (sides[0], sides[1] if len(sides) == 2 else 0)


def _step(name: str, cfg: Mapping[str, Any], where: str, randaugment_on: str, passes: int) -> Op:
    """The op that replays ml-dr's transform ``name`` configured by ``cfg`` (``passes``: its Pillow resizes')."""
    if name == "resize":
        if cfg.get("max_size") is not None:
            raise InvalidSpec(f"{where}: resize with max_size {cfg['max_size']!r} — kdcache replays torchvision's "
                              "Resize without it (no published config sets it)")
        height, width = _side(cfg.get("size"), "resize", where, shorter=True)
        code = _CODES[_interpolation(cfg.get("interpolation", "bilinear"), "resize", where)]
        return Resize(height, width, passes, interpolation=code)
    if name == "random_crop":
        return _random_crop(cfg, where)
    if name == "random_resized_crop":
        height, width = _side(cfg.get("size"), "random_resized_crop", where)
        if height != width:
            raise InvalidSpec(f"{where}: random_resized_crop size {cfg.get('size')!r} is not square — kdcache views "
                              "are square")
        return PilResizedCrop(*_pair(cfg.get("scale"), (0.08, 1.0)), *_pair(cfg.get("ratio"), (3 / 4, 4 / 3)),
                              passes=passes)
    if name == "random_horizontal_flip":
        return HorizontalFlip(float(cfg.get("p", 0.5)))
    if name == "rand_augment":
        if cfg.get("interpolation", 0) not in (0, "nearest") or cfg.get("fill") is not None:
            raise InvalidSpec(f"{where}: rand_augment with an interpolation or fill of its own — kdcache replays "
                              "torchvision's defaults (nearest, no fill)")
        num_ops = cfg.get("num_ops", 2)
        if not isinstance(num_ops, int) or isinstance(num_ops, bool):  # ml-dr's own loop (range) needs an int
            raise InvalidSpec(f"{where}: rand_augment num_ops {num_ops!r} is not a whole number of ops")
        return RENDERINGS[randaugment_on](num_ops)
    if name == "random_erase":
        return RandomErasing(float(cfg.get("p", 0.5)), *_pair(cfg.get("scale"), (0.02, 0.33)),
                             *_pair(cfg.get("ratio"), (0.3, 3.3)))
    if name == "mixup":
        return MixUp(float(cfg.get("alpha", 1.0)), float(cfg.get("p", 1.0)))
    return CutMix(float(cfg.get("alpha", 1.0)), float(cfg.get("p", 1.0)))


def _random_crop(cfg: Mapping[str, Any], where: str) -> PaddedCrop:
    height, width = _side(cfg.get("size"), "random_crop", where)
    padding, mode = cfg.get("padding") or 0, cfg.get("padding_mode", "constant")
    fill = cfg.get("fill", 0)
    if not isinstance(padding, int) or isinstance(padding, bool) or mode not in PADDING_MODES \
            or not isinstance(fill, int) or isinstance(fill, bool):
        raise InvalidSpec(f"{where}: random_crop padding {padding!r}, fill {fill!r} or padding_mode {mode!r} is "
                          "not one kdcache replays — an int padding and fill, and one of torchvision's modes")
    return PaddedCrop(height=height, width=width if width != height else 0, padding=padding, fill=fill,
                      padding_mode=PADDING_MODES.index(mode), pad_if_needed=int(bool(cfg.get("pad_if_needed", False))))


def recipe_of(steps: Mapping[str, Mapping[str, Any]], where: str, sizes: Callable[[], np.ndarray],
              randaugment_on: str = "pil", passes: int = 2) -> tuple[Recipe, int, str]:
    """The kdcache recipe, view side and interpolation of ml-dr's transforms. ``sizes()`` gives every image's
    (height, width) [N, 2], consulted only where no transform gives the views one size; ``passes``: how its
    Pillow resizes run (kdcache.augment.op.PASSES)."""
    if "center_crop" in steps:  # CenterCrop.forward calls .contiguous() on what it returns: a PIL image has none
        raise InvalidSpec(f"{where}: center_crop — ml-dr's CenterCrop fails on the PIL images its writer and reader "
                          "give it ('Image' object has no attribute 'contiguous'), so no ml-dr source holds it")
    ops = [_step(name, cfg, where, randaugment_on, passes) for name, cfg in steps.items() if name not in NO_PARAM]
    crop_side = _side(steps["random_resized_crop"].get("size"), "random_resized_crop", where)[0] \
        if "random_resized_crop" in steps else 0
    side = _view_side(ops, crop_side, sizes, where)
    ops = [CutMix(op.alpha, op.p, grid=side) if isinstance(op, CutMix) else op for op in ops]  # whole view pixels
    sizing = [name for name in ("random_resized_crop", "resize") if name in steps]
    interpolation = _interpolation(steps[sizing[0]].get("interpolation", "bilinear"), sizing[0], where) if sizing \
        else "bilinear"
    return Recipe(tuple(ops)), side, interpolation


def shape_after(ops: Sequence[Op], height: int, width: int, crop_side: int) -> tuple[int, int]:
    """The (height, width) an image of that size has after the sizing ops among ``ops`` (torchvision's
    arithmetic: a shorter-side resize keeps the aspect, truncating the longer side; a random resized crop
    gives ``crop_side``)."""
    for op in ops:
        if isinstance(op, Resize):
            width, height = op.output_size(width, height)
        elif isinstance(op, (CenterCrop, PaddedCrop)):
            height, width = op.height, op.width or op.height
        elif isinstance(op, PilResizedCrop):
            height, width = crop_side, crop_side
    return height, width


def _view_side(ops: list[Op], crop_side: int, sizes: Callable[[], np.ndarray], where: str) -> int:
    """The one side of every view; InvalidSpec where the views differ in size or are not square."""
    last = [op for op in ops if op.sizes][-1:]
    if last and not (isinstance(last[0], Resize) and last[0].width == 0):
        shapes = {shape_after(last, 0, 0, crop_side)}  # a crop or a resize to a fixed shape
    else:  # each image's own shape, or its shorter side resized
        shapes = {shape_after(ops, int(h), int(w), crop_side) for h, w in np.unique(np.asarray(sizes()), axis=0)}
    if len(shapes) != 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(shapes)[:3]) + (" ..." if len(shapes) > 3 else "")
        raise InvalidSpec(f"{where}: ml-dr's views here are {shown} px (height x width) — kdcache views share one "
                          "square size, so it imports reinforcements whose transforms end in a square crop or resize "
                          "(ml-dr's own writer cannot batch views of different sizes either)")
    return next(iter(shapes))[0]


def randaugment_rows(value: Any, num_ops: int, at: str) -> np.ndarray:
    """One view's stored ``rand_augment`` params, ``None`` (skipped) or ``num_ops`` pairs of (op name, or its
    index when compressed; signed magnitude), as the op's [num_ops, 2] float64 rows; DataCorrupt otherwise."""
    rows = np.zeros((num_ops, 2), dtype=np.float64)
    rows[:, 0] = NO_OP
    if value is None:
        return rows
    if not isinstance(value, (list, tuple)) or len(value) != num_ops:
        raise DataCorrupt(f"{at}: rand_augment holds {value!r}, not {num_ops} (op, magnitude) pairs — the source is "
                          "damaged")
    for k, step in enumerate(value):
        op, magnitude = step if isinstance(step, (list, tuple)) and len(step) == 2 else (None, None)
        index = RA_NAMES.index(op) if isinstance(op, str) and op in RA_NAMES else op
        number = isinstance(magnitude, (int, float, np.integer, np.floating)) and not isinstance(magnitude, bool)
        why = check_randaugment_step(int(index), float(magnitude)) if _index(index) and number else \
            f"step {step!r} is not an op of {', '.join(RA_NAMES)} with a magnitude"
        if why is not None:
            raise DataCorrupt(f"{at}: rand_augment {why} — the source is damaged")
        rows[k] = (int(index), float(magnitude))
    return rows


def _index(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
        and 0 <= int(value) < len(RA_NAMES)


def crop_offsets(value: Any, op: PaddedCrop, height: int, width: int, at: str) -> np.ndarray:
    """One view's ``random_crop`` params ``(top, left)`` on the padded image of an ``height`` x ``width`` image,
    as the op's int32 pair; DataCorrupt where they do not lie inside it."""
    top, left = (int(v) for v in integers(list(value)[:2], at, "random_crop")) if isinstance(value, (list, tuple)) \
        and len(value) >= 2 else (-1, -1)
    crop_h, crop_w = op.height, op.width or op.height
    padded_h, padded_w = height + 2 * op.padding, width + 2 * op.padding
    if op.pad_if_needed:  # torchvision pads both sides by the shortfall
        padded_h, padded_w = max(padded_h, 2 * crop_h - padded_h), max(padded_w, 2 * crop_w - padded_w)
    if not (0 <= top <= padded_h - crop_h and 0 <= left <= padded_w - crop_w):
        raise DataCorrupt(f"{at}: random_crop offset {value!r} lies outside the {padded_h}x{padded_w} padded image — "
                          "the source is damaged, or made over other data")
    return np.array([top, left], dtype=np.int32)
