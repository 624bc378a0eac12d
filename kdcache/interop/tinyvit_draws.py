"""TinyViT's per-sample random stream: every draw of its training augmentation, in its order, as numbers.

Follows microsoft/Cream 4a13c40, TinyViT/data/augmentation: ``dataset_wrapper.py`` runs the transform of sample
``t`` under ``AugRandomContext(seed)``, which makes ``aug_random.random`` and ``np_random`` draw from one
``numpy.random.Generator(PCG64(seed))`` (``aug_random.py``): ``random()`` is the generator's ``random()``,
``uniform(a, b)`` is ``random()*(b-a)+a``, ``randint(a, b)`` is ``min(int(random()*(b-a+1))+a, b)`` and
``gauss`` its ``normal``. The transform (``transforms_factory.py``) draws, in order: the random resized crop
(``transforms.py``), the flip (``aug_tv_transforms.py``), RandAugment (``auto_augment.py``) and, after
ToTensor and Normalize, random erasing (``random_erasing.py``, with its noise from a fresh MT19937 seeded from
the stream). The functions here make the same draws and return what each step did, so that kdcache's ops
replay it: the crop's pixels, the flip, each RandAugment op with its final argument, each erased box with its
noise seed.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

SCALE, RATIO, HFLIP = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), 0.5  # transforms_imagenet_train's defaults
LEVEL_DENOM = 10.0
#: RandAugment's op lists (``_RAND_TRANSFORMS``, ``_RAND_INCREASING_TRANSFORMS``), as kdcache's ``timmra`` ops.
PLAIN = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
         "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
INCREASING = frozenset({"posterize", "solarize", "color", "contrast", "brightness", "sharpness"})
#: ``_RAND_CHOICE_WEIGHTS_0`` in the order of the op lists (``rand-...-w0``).
WEIGHTS_0 = (0.025, 0.005, 0, 0.3, 0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2, 0.1, 0.1)
REF = 224  # RandomErasing's reference frame (REF_H, REF_W)


#: The largest RandAugment magnitude (m, mmax) imported: its arguments then stay inside what ``timmra`` stores
#: (timm_ops.MAX_ARGUMENT, MAX_BITS).
MAX_LEVEL = 1000


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """``rand_augment_transform``'s reading of an ``AUG.AUTO_AUGMENT`` string such as ``rand-m9-mstd0.5-inc1``."""

    magnitude: float = LEVEL_DENOM
    num_layers: int = 2
    std: float = 0.0  # inf: uniform in [0, magnitude]
    max: float | None = None
    increasing: bool = False
    weights: bool = False
    translate_pct: float = 0.45

    @classmethod
    def parse(cls, text: str) -> RandAugmentConfig:
        """ValueError for a string ``rand_augment_transform`` would not take."""
        sections = text.split("-")
        if sections[0] != "rand":
            raise ValueError(f"{text!r} is not a RandAugment string (rand-...)")
        values: dict = {}
        for section in sections[1:]:
            parts = re.split(r"(\d.*)", section)
            if len(parts) < 2:
                continue
            key, value = parts[:2]
            if key == "mstd":
                values["std"] = math.inf if float(value) > 100 else float(value)
            elif key == "mmax":
                values["max"] = float(int(value))
            elif key == "inc":
                values["increasing"] = bool(value)  # TinyViT's bool('0') is True too
            elif key == "m":
                values["magnitude"] = float(int(value))
            elif key == "n":
                values["num_layers"] = int(value)
            elif key == "w":
                if int(value) != 0:
                    raise ValueError(f"RandAugment weights w{value}: TinyViT has only w0")
                values["weights"] = True
            else:
                raise ValueError(f"RandAugment section {section!r} is not one TinyViT knows")
        too_big = [f"{key} {values[key]:g}" for key in ("magnitude", "max") if values.get(key, 0) > MAX_LEVEL]
        if too_big:  # real configs use at most 30; far above, the drawn arguments leave timmra's stored domain
            raise ValueError(f"RandAugment {' and '.join(too_big)} is above {MAX_LEVEL}")
        return cls(**values)


class Stream:
    """``aug_random``'s calls on one ``Generator(PCG64(seed))``."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def random(self) -> float:
        return float(self.rng.random())

    def uniform(self, a: float, b: float) -> float:
        return self.random() * (b - a) + a

    def randint(self, a: int, b: int) -> int:
        return min(int(self.random() * (b - a + 1)) + a, b)

    def negate(self, v: float) -> float:
        """``_randomly_negate``."""
        return -v if self.random() > 0.5 else v


def crop(stream: Stream, width: int, height: int) -> tuple[int, int, int, int]:
    """``RandomResizedCropAndInterpolation.get_params``: (top, left, height, width) of the crop."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = stream.uniform(*SCALE) * area
        aspect_ratio = math.exp(stream.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            return stream.randint(0, height - h), stream.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        w, h = int(round(height * max(RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def randaugment(stream: Stream, config: RandAugmentConfig) -> np.ndarray:
    """``RandAugment.__call__`` with ``AugmentOp``: [num_layers, 2] float64 rows of (op index in PLAIN, the argument
    its PIL function takes), or (-1, 0) for an op its probability 0.5 skipped."""
    weights = np.asarray(WEIGHTS_0, dtype=np.float64) / sum(WEIGHTS_0) if config.weights else None
    chosen = stream.rng.choice(len(PLAIN), config.num_layers, replace=weights is None, p=weights)
    rows = np.zeros((config.num_layers, 2), dtype=np.float64)
    for k, index in enumerate(chosen.tolist()):
        if stream.random() > 0.5:
            rows[k] = (-1, 0.0)
            continue
        level = config.magnitude
        if config.std == math.inf:
            level = stream.uniform(0, level)
        elif config.std > 0:
            level = float(stream.rng.normal(level, config.std))
        level = max(0.0, min(level, config.max or LEVEL_DENOM))
        rows[k] = (index, argument(stream, PLAIN[index], level, config))
    return rows


def argument(stream: Stream, op: str, level: float, config: RandAugmentConfig) -> float:
    """The argument ``LEVEL_TO_ARG`` gives op ``op`` at ``level`` (drawing its sign where it has one); a translate's
    is its fraction of the side (``translate_pct`` of TinyViT's Rel ops)."""
    fraction = level / LEVEL_DENOM
    increasing = config.increasing and op in INCREASING
    if op == "rotate":
        return stream.negate(fraction * 30.0)
    if op == "posterize":
        return 4 - int(fraction * 4) if increasing else int(fraction * 4)
    if op == "solarize":
        return 256 - int(fraction * 256) if increasing else int(fraction * 256)
    if op == "solarize_add":
        return int(fraction * 110)
    if op in ("color", "contrast", "brightness", "sharpness"):
        return max(0.1, 1.0 + stream.negate(fraction * 0.9)) if increasing else fraction * 1.8 + 0.1
    if op in ("shear_x", "shear_y"):
        return stream.negate(fraction * 0.3)
    if op in ("translate_x", "translate_y"):
        return stream.negate(fraction * config.translate_pct)
    return 0.0  # autocontrast, equalize, invert


def erase(stream: Stream, side: int, probability: float, mode: str, max_count: int) -> np.ndarray:
    """``RandomErasing._erase`` on a side x side view: [max_count, 5] int64 rows of (top, left, height, width,
    noise seed), height 0 for a row not erased; the noise seed is -1 in ``const`` mode, which draws none."""
    rows = np.zeros((max_count, 5), dtype=np.int64)
    if stream.random() > probability:
        return rows
    count = 1 if max_count == 1 else stream.randint(1, max_count)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for c in range(count):
        for _ in range(10):
            target_area = stream.uniform(0.02, 1 / 3) * REF * REF / count
            aspect_ratio = math.exp(stream.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < REF and h < REF:
                top, left = stream.randint(0, REF - h), stream.randint(0, REF - w)
                top = min(int(round(top * side / REF)), side - 1)
                left = min(int(round(left * side / REF)), side - 1)
                h = min(int(round(h * side / REF)), side - top)
                w = min(int(round(w * side / REF)), side - left)
                seed = stream.randint(0, 1 << 30) if mode in ("pixel", "rand") else -1
                rows[c] = (top, left, h, w, seed)
                break
    return rows
