"""A timm training transform as one recorded op: a seed per view, replayed by running timm's own transform.

``timm:rand-m9-mstd0.5-inc1,re=0.25,jitter=0.4`` is what timm's train.py builds with ``create_transform(
is_training=True, auto_augment=..., re_prob=..., color_jitter=...)``: a random resized crop, flips,
RandAugment (or AutoAugment, AugMix, colour jitter), ToTensor, Normalize and random erasing. timm draws from
Python's ``random``, NumPy's global ``RandomState`` and torch's default generator, so the op stores one 32-bit
seed per (sample, view), seeds all three with it around one call of the transform (under a lock, the global
streams as they were after; another thread drawing from them during a render would move its draws), and
replays the view by doing the same again. The
pixels are timm's, so they depend on the versions of timm, torch, torchvision, Pillow and NumPy: the manifest
records them, and another version is refused unless the user allows the drift (docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import random
import threading
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from kdcache.augment.op import Fields, Op, outside
from kdcache.augment.rng import Draws
from kdcache.errors import InvalidSpec, UnsupportedFormat

PACKAGES = ("timm", "torch", "torchvision", "pillow", "numpy")
#: option -> (create_transform's argument, parse, default); the spec names only the options that differ.
OPTIONS: dict[str, tuple[str, Any, Any]] = {
    "re": ("re_prob", float, 0.0),
    "remode": ("re_mode", str, "const"),
    "recount": ("re_count", int, 1),
    "jitter": ("color_jitter", float, 0.4),
    "scale": ("scale", lambda t: tuple(float(v) for v in t.split("/")), (0.08, 1.0)),
    "ratio": ("ratio", lambda t: tuple(float(v) for v in t.split("/")), (3 / 4, 4 / 3)),
    "hflip": ("hflip", float, 0.5),
    "vflip": ("vflip", float, 0.0),
    "interp": ("interpolation", str, "bilinear"),
    "mean": ("mean", lambda t: tuple(float(v) for v in t.split("/")), (0.485, 0.456, 0.406)),
    "std": ("std", lambda t: tuple(float(v) for v in t.split("/")), (0.229, 0.224, 0.225)),
}
USAGE = ("timm[:AUTO_AUGMENT][,key=value...], e.g. timm:rand-m9-mstd0.5-inc1,re=0.25,jitter=0.4 (keys: "
         + ", ".join(OPTIONS) + ")")
_LOCK = threading.Lock()
#: A view timm cannot render under its seed (timm 1.0 asks Pillow 13 to posterize to 0 bits, which it refuses,
#: when RandAugment's increasing magnitude reaches 10) is rendered under the next seed of a fixed sequence, the
#: same on every replay; after RETRIES seeds the recipe is refused.
RETRIES = 8
_STEP = 0x9E3779B9
#: The most ops or boxes a view may ask for (RandAugment's n, AugMix's width and depth, erasing's count), as
#: kdcache's own RandAugment ops allow.
MAX_COUNT = 16


def installed_versions() -> dict[str, str]:
    """The versions of the packages a timm recipe's pixels depend on ("absent" for one not installed)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


@dataclasses.dataclass(frozen=True)
class TimmRecipe(Op):
    """timm's training transform, run under a recorded per-view seed (see the module docstring)."""

    name = "timm"
    usage = USAGE
    sizes = True
    pil = prefers_pil = True
    whole: ClassVar[bool] = True  # renders the whole view: the only op of a recipe besides mixing
    floats = True
    options: str = ""  # canonical ``AUTO_AUGMENT,key=value,...`` text
    versions: tuple[tuple[str, str], ...] = ()
    drift_ok: bool = dataclasses.field(default=False, compare=False)

    @classmethod
    def parse(cls, args: list[str]) -> Op:
        options = canonical(":".join(args))
        _built(options, 224)  # timm checks its arguments when it builds the transform: here, not at the first view
        return cls(options, tuple(sorted(installed_versions().items())))

    @classmethod
    def from_hyper(cls, hyper: Mapping[str, Any]) -> Op:
        if set(hyper) != {"options", "versions"} or not isinstance(hyper["options"], str) \
                or not isinstance(hyper["versions"], Mapping):
            raise InvalidSpec(f"manifest entry for timm has keys {sorted(hyper)}, expected options and versions — "
                              "rewrite the recipe from its spec")
        if set(hyper["versions"]) != set(PACKAGES):
            raise InvalidSpec(f"manifest entry for timm records the versions of {sorted(hyper['versions'])}, not of "
                              f"every package its pixels depend on ({', '.join(PACKAGES)}) — the manifest was edited; "
                              "precompute the cache again")
        return cls(canonical(hyper["options"]), tuple(sorted((str(k), str(v)) for k, v in hyper["versions"].items())))

    def hyper(self) -> dict[str, Any]:
        return {"options": self.options, "versions": dict(self.versions)}

    def spec(self) -> str:
        return f"timm:{self.options}" if self.options else "timm"

    def fields(self) -> Fields:
        return {"timm": ((), "int64")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        return outside(prefix + "timm", params[prefix + "timm"], 0, 2**32 - 1)

    def sample(self, draws: Draws) -> dict[str, np.ndarray]:
        return {"timm": draws.words(1)[:, 0].astype(np.int64)}

    def drift(self) -> str | None:
        """What differs between the recorded and the installed versions, or None."""
        now = installed_versions()
        changed = [f"{name} {was} (now {now.get(name, 'absent')})" for name, was in self.versions if now.get(name) != was]
        return ", ".join(changed) or None

    def check_versions(self) -> None:
        """UnsupportedFormat where the installed packages differ from the recorded ones, unless ``drift_ok``
        (then a warning)."""
        changed = self.drift()
        if changed is None:
            return
        if not self.drift_ok:
            raise UnsupportedFormat(f"the timm recipe's views were drawn with {changed}; other versions may draw other "
                                    "pixels — install those versions (or, to train or verify anyway, pass --allow-version-drift "
                                    "and check a sample with `kdcache verify CACHE --recompute N --allow-version-drift`)")
        warnings.warn(f"replaying a timm recipe drawn with {changed}: the views may differ from the teacher's",
                      stacklevel=2)

    def apply_pil(self, image: Image.Image, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        if not self.drift_ok:
            _checked(self)
        if image.mode != "RGB":
            raise InvalidSpec(f"a timm recipe renders RGB images, this one is {image.mode} — use kdcache's own ops "
                              "(rrc+flip+randaugment...)")
        transform, mean, std = _built(self.options, size)
        pil = image
        seed = int(np.asarray(row["timm"]))
        for attempt in range(RETRIES):
            try:
                return _seeded(transform, pil, (seed + attempt * _STEP) % 2**32).mul_(std).add_(mean)  # to [0, 1]
            except FAILURES as exc:
                if not isinstance(exc, ValueError) or "bits" not in str(exc):  # Pillow 13's posterize to 0 bits
                    raise InvalidSpec(f"timm's transform fails on a view ({type(exc).__name__}: {exc}) — use another "
                                      "recipe") from None
                failure = exc
        raise InvalidSpec(f"timm's transform fails under seed {seed} and the {RETRIES - 1} seeds after it "
                          f"({failure}) — use another recipe or other timm/Pillow versions")


def _seeded(transform: Any, pil: Any, seed: int) -> torch.Tensor:
    """``transform(pil)`` with Python's and torch's global generators seeded with ``seed``, and NumPy's legacy
    functions (``np.random.choice`` and the rest) drawing from a RandomState seeded with it (the numbers
    ``np.random.seed(seed)`` gives; swapping the functions is 20x cheaper than saving the global state), under a
    lock; every global stream is as it was after."""
    with _LOCK:
        states = random.getstate(), torch.random.get_rng_state()
        _PRIVATE.seed(seed)
        try:
            random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
            for name, method in _SWAPS:
                setattr(np.random, name, method)
            return transform(pil)
        finally:
            for name, original in _ORIGINALS:
                setattr(np.random, name, original)
            random.setstate(states[0])
            torch.random.set_rng_state(states[1])


_PRIVATE = np.random.RandomState(0)
#: NumPy's legacy module functions (bound methods of its global RandomState) and the private ones that stand in.
_ORIGINALS = [(name, getattr(np.random, name)) for name in np.random.mtrand.__all__
              if getattr(getattr(np.random, name, None), "__self__", None) is np.random.mtrand._rand]
_SWAPS = [(name, getattr(_PRIVATE, name)) for name, _ in _ORIGINALS]


@lru_cache(maxsize=None)
def _checked(op: TimmRecipe) -> bool:
    op.check_versions()
    return True


#: What timm's transform raises for arguments it cannot use, when built or when run.
FAILURES = (ArithmeticError, AssertionError, IndexError, KeyError, RuntimeError, TypeError, ValueError)


def _built(options: str, size: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """:func:`_transform`, InvalidSpec in one line where timm does not build it."""
    try:
        return _transform(options, size)
    except FAILURES as exc:
        raise InvalidSpec(f"timm does not build a transform from {options or 'timm'!r} ({type(exc).__name__}: "
                          f"{exc}) — use {USAGE}") from None


@lru_cache(maxsize=16)
def _transform(options: str, size: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """timm's training transform for ``options`` at ``size``, and the mean and std it normalises with."""
    from kdcache.extras import require

    data = require("timm.data", "timm", "timm: augmentation recipes")
    kwargs = create_kwargs(options)
    transform = data.create_transform(input_size=size, is_training=True, **kwargs)
    mean, std = (torch.tensor(kwargs[key], dtype=torch.float32).view(-1, 1, 1) for key in ("mean", "std"))
    return transform, mean, std


def create_kwargs(options: str) -> dict[str, Any]:
    """``create_transform``'s keyword arguments for canonical ``options``."""
    aa, *pairs = options.split(",") if options else [""]
    kwargs = {arg: default for arg, _, default in OPTIONS.values()}
    kwargs["auto_augment"] = aa if aa not in ("", "none") else None
    for pair in pairs:
        key, value = pair.split("=", 1)
        arg, parse, _ = OPTIONS[key]
        kwargs[arg] = parse(value)
    return kwargs


def canonical(text: str) -> str:
    """The spec's options in one spelling: the auto-augment first, then the keys that differ from their
    defaults in OPTIONS' order; InvalidSpec for an unknown key or a value that does not parse."""
    aa, *pairs = text.split(",") if text else [""]
    if "=" in aa:
        aa, pairs = "", [aa, *pairs]
    aa = "" if aa in ("", "none") else aa
    if aa and not aa.startswith(("rand", "augmix", "original", "v0", "3a")):
        raise InvalidSpec(f"timm auto-augment {aa!r} is not a RandAugment (rand-...), AugMix (augmix-...) or "
                          f"AutoAugment policy (original, originalr, v0, v0r, 3a) — use {USAGE}")
    given: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in OPTIONS:
            raise InvalidSpec(f"timm option {pair!r} is not key=value with a key of {', '.join(OPTIONS)} — use {USAGE}")
        try:
            given[key] = OPTIONS[key][1](value)
        except ValueError:
            raise InvalidSpec(f"timm option {key}={value!r} does not parse — use {USAGE}") from None
        _check_option(key, value, given[key])
    _check_counts(aa)
    pairs = [f"{key}={_text(given[key])}" for key in OPTIONS if key in given and given[key] != OPTIONS[key][2]]
    return ",".join([aa or "none", *pairs]) if pairs else aa


#: Each numeric option's count of numbers and the closed range they must lie in: probabilities, a colour jitter
#: strength, crop area fractions and aspect ratios, mean and std of images in [0, 1].
RANGES = {"re": (1, 0.0, 1.0), "hflip": (1, 0.0, 1.0), "vflip": (1, 0.0, 1.0), "recount": (1, 1, MAX_COUNT),
          "jitter": (1, 0.0, 10.0), "scale": (2, 1e-6, 1.0), "ratio": (2, 1e-3, 1e3), "mean": (3, 0.0, 1.0),
          "std": (3, 1e-3, 10.0)}


def _check_option(key: str, text: str, value: Any) -> None:
    """InvalidSpec unless a numeric option holds its count of finite numbers within RANGES (NaN fails too)."""
    if key not in RANGES:
        return
    count, low, high = RANGES[key]
    values = value if isinstance(value, tuple) else (value,)
    if len(values) != count or not all(low <= v <= high for v in values) \
            or key in ("scale", "ratio") and values[0] > values[1]:
        numbers = f"{count} '/'-separated numbers" if count > 1 else "a number"
        order = ", low/high" if key in ("scale", "ratio") else ""
        raise InvalidSpec(f"timm option {key}={text!r} needs {numbers} from {low:g} to {high:g}{order} — use {USAGE}")


def _check_counts(aa: str) -> None:
    """InvalidSpec where the auto-augment asks for more ops per view than MAX_COUNT (RandAugment's ``n``, AugMix's
    width ``w`` and depth ``d``): each is a loop per view, and a billion of them never ends."""
    kind = aa.split("-")[0]
    for token in aa.split("-")[1:]:
        key = token.rstrip("0123456789.e+-")
        number = token[len(key):]
        counted = kind == "rand" and key == "n" or kind == "augmix" and key in ("w", "d")
        if counted and number and not (number.isdigit() and int(number) <= MAX_COUNT):
            raise InvalidSpec(f"timm auto-augment {aa!r}: {key}{number} is not a count from 0 to {MAX_COUNT} — use "
                              f"{USAGE}")


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(_text(v) for v in value)
    return repr(value).removesuffix(".0") if isinstance(value, float) else str(value)
