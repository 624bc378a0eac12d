"""What every recorded augmentation op provides, and the small helpers the ops share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as pil_functional

from kdcache.augment.rng import Draws
from kdcache.errors import InvalidSpec

Fields = dict[str, tuple[tuple[int, ...], str]]

# Stages: ops must appear in non-decreasing stage order in a spec.
PIXEL = 0  # geometric and colour ops, on the uint8 image
ERASE = 1  # random erasing, after every geometric/colour op
MIX = 2  # MixUp / CutMix, last

BOX_SCALE = 65535  # uint16 fixed point: a stored box coordinate q is q / BOX_SCALE of the image side


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of a recipe: samples its params from a Draws stream, replays them on an image.

    Subclasses are frozen dataclasses whose fields are the op's hyper-parameters; ``args`` names
    the ones a spec may set positionally (``rrc:0.35`` sets ``min_scale``).
    """

    name: ClassVar[str]
    usage: ClassVar[str]
    version: ClassVar[int] = 1
    stage: ClassVar[int] = PIXEL
    args: ClassVar[tuple[str, ...]] = ()
    #: Whether the op sets the view's size (a crop or resize); a recipe without one resizes the image first.
    sizes: ClassVar[bool] = False
    #: Whether kdcache can draw the op's params; False for ops that only replay params read from another
    #: project's files (their values depend on the image size at that step, which sampling does not see).
    sampled: ClassVar[bool] = True
    #: Whether ``apply`` returns the float32 view in [0, 1] (not uint8): such an op is the view's last.
    floats: ClassVar[bool] = False
    #: Whether the op has ``apply_pil`` (it then runs on a PIL image the step before left, saving conversions),
    #: and whether it converts a tensor to run there (an op whose pixels are Pillow's).
    pil: ClassVar[bool] = False
    prefers_pil: ClassVar[bool] = False
    #: Hyper-parameters added after the op's first release, and the value that replays manifests without them.
    compat: ClassVar[dict[str, Any]] = {}

    @classmethod
    def parse(cls, args: list[str]) -> Op:
        """Build the op from the ``:``-separated arguments that followed its name in a spec."""
        if len(args) > len(cls.args):
            got = ":".join(args)
            raise InvalidSpec(f"{cls.name} takes at most {len(cls.args)} argument(s), got {got!r} — use {cls.usage}")
        return cls(**{key: _number(cls, key, text) for key, text in zip(cls.args, args)})

    @classmethod
    def from_hyper(cls, hyper: Mapping[str, Any]) -> Op:
        """Build the op from the hyper-parameter dict that ``hyper()`` wrote into a manifest."""
        hyper = {**cls.compat, **hyper}
        names = {f.name for f in dataclasses.fields(cls)}
        if set(hyper) != names:
            raise InvalidSpec(
                f"manifest entry for {cls.name} has keys {sorted(hyper)}, expected {sorted(names)} — "
                "rewrite the recipe from its spec"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {}
        for key, value in hyper.items():
            kind = type(defaults[key])
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or (kind is int and not float(value).is_integer()):
                raise InvalidSpec(
                    f"manifest value {cls.name}.{key}={value!r} is not a valid {kind.__name__} — "
                    "rewrite the recipe from its spec"
                )
            values[key] = kind(value)
        return cls(**values)

    def hyper(self) -> dict[str, Any]:
        """Every hyper-parameter, JSON-able."""
        return dataclasses.asdict(self)

    def spec(self) -> str:
        """Canonical spec text: the name plus positional args, trailing defaults dropped."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        values = [getattr(self, key) for key in self.args]
        while values and values[-1] == defaults[self.args[len(values) - 1]]:
            values.pop()
        return ":".join([self.name, *map(format_number, values)])

    def fields(self) -> Fields:
        """Stored param arrays: field name -> (tail shape, numpy dtype name)."""
        raise NotImplementedError

    def sample(self, draws: Draws) -> dict[str, np.ndarray]:
        """Params of a batch of views, field -> [B, *tail] in the stored dtype."""
        raise NotImplementedError

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        """Why a batch of stored rows of this op's fields (``params[prefix + field]``, [B, *tail]) holds values
        this op never writes, or None: a shared cache is untrusted, and a value outside an op's domain crashes,
        hangs or silently changes a replay. Here: every float is finite; each op adds its own domain."""
        for name, (_, dtype) in self.fields().items():
            values = np.asarray(params[prefix + name])
            if np.dtype(dtype).kind == "f" and not np.isfinite(values).all():
                return f"aug/{prefix}{name} holds {values[~np.isfinite(values)].flat[0].item()!r}, not a finite number"
        return None

    def apply(self, image: torch.Tensor, row: Mapping[str, np.ndarray], size: int) -> torch.Tensor:
        """Replay this op's stored params (one view's row) on a uint8 [C,H,W] image."""
        if self.pil:
            out = self.apply_pil(to_pil(image), row, size)
            return from_pil(out) if isinstance(out, Image.Image) else out
        raise NotImplementedError

    def apply_pil(self, image: Image.Image, row: Mapping[str, np.ndarray], size: int) -> Image.Image | torch.Tensor:
        """:meth:`apply` on a PIL image (ops with ``pil``): the same pixels, as a PIL image (or the finished
        float view)."""
        raise NotImplementedError


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 [C,H,W] tensor (1 or 3 channels) as the PIL image holding the same pixels."""
    pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


#: How many passes a Pillow resize takes: 2, horizontal then vertical, as Pillow 9.5 to 12.2 do in one call (Pillow
#: 13 takes the vertical pass first for some shapes, which changes pixels by a few levels), so the same pixels come
#: under any Pillow; 1, one ``Image.resize``: the installed Pillow's own order.
PASSES = (1, 2)


def pil_resize(image: Image.Image, size: tuple[int, int], resample: int, passes: int) -> Image.Image:
    """``image`` resized to ``size`` (width, height) with Pillow's ``resample``, in ``passes`` (see PASSES)."""
    width, height = size
    if passes == 2 and resample != Image.Resampling.NEAREST and image.width != width and image.height != height:
        image = image.resize((width, image.height), resample)
    return image.resize((width, height), resample)


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 [C,H,W] tensor (exactly its pixels)."""
    return pil_functional.pil_to_tensor(image)


def _number(cls: type[Op], key: str, text: str) -> int | float:
    kind = type(next(f.default for f in dataclasses.fields(cls) if f.name == key))
    try:
        value = float(text)
    except ValueError:
        raise InvalidSpec(f"{cls.name} argument {key}={text!r} is not a number — use {cls.usage}") from None
    if kind is int:
        if not value.is_integer():
            raise InvalidSpec(f"{cls.name} argument {key}={text!r} must be a whole number — use {cls.usage}")
        return int(value)
    return value


def format_number(value: float) -> str:
    """Shortest text that parses back to ``value`` exactly (``1.0`` -> ``1``)."""
    return repr(value).removesuffix(".0")


def check_range(
    op: str, key: str, value: float, low: float, high: float, usage: str, *, open_low: bool = False
) -> None:
    """Raise InvalidSpec unless low <= value <= high (low < value when ``open_low``)."""
    ok = (value > low if open_low else value >= low) and value <= high and math.isfinite(value)
    if not ok:
        bracket = "(" if open_low else "["
        allowed = f"{bracket}{format_number(low)}, {format_number(high)}{')' if math.isinf(high) else ']'}"
        raise InvalidSpec(f"{op} {key} must be in {allowed}, got {format_number(value)} — use {usage}")


#: The largest view side, and image side after sizing, a recorded box or offset may lie in.
MAX_SIDE = 8192


def outside(name: str, values: np.ndarray, low: float, high: float) -> str | None:
    """A stored array's first value outside [low, high] (NaN too), as a reason, or None."""
    values = np.asarray(values)
    bad = ~((values >= low) & (values <= high))
    return f"aug/{name} holds {values[bad].flat[0].item()!r}, outside [{_bound(low)}, {_bound(high)}]" \
        if bad.any() else None


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else f"{x:g}"


def unit_boxes(name: str, boxes: np.ndarray) -> str | None:
    """Stored (x0, y0, w, h) fractions [..., 4] that do not lie in the unit square, as a reason, or None."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return outside(name, boxes, 0.0, 1.0) or outside(name + " (x0 + w, y0 + h)", boxes[..., :2] + boxes[..., 2:],
                                                      0.0, 1.0 + 1e-6)


def quantise_box(x0: np.ndarray, y0: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Normalised boxes (float64 [B] each, inside the unit square) as uint16 fixed point [B, 4].

    A stored q means q / BOX_SCALE of the side. w and h round to nearest, but to at least 1, so a
    box is never empty; x0 and y0 round to nearest, then move back by at most one step where that
    would push the far edge past the image (x0 + w <= 1 in integers, hence exactly).
    """
    wq = np.maximum(np.rint(np.asarray(w, dtype=np.float64) * BOX_SCALE), 1)
    hq = np.maximum(np.rint(np.asarray(h, dtype=np.float64) * BOX_SCALE), 1)
    x0q = np.clip(np.rint(np.asarray(x0, dtype=np.float64) * BOX_SCALE), 0, BOX_SCALE - wq)
    y0q = np.clip(np.rint(np.asarray(y0, dtype=np.float64) * BOX_SCALE), 0, BOX_SCALE - hq)
    return np.stack([x0q, y0q, wq, hq], axis=1).astype(np.uint16)


def box_row(row: Mapping[str, np.ndarray], field: str) -> tuple[float, float, float, float]:
    """A stored normalised box (x0, y0, w, h) as Python floats, exactly as every replay reads it.

    Integer (fixed-point) boxes decode to q / BOX_SCALE in float64 (correctly rounded, so the same
    everywhere); float boxes give the exact values of their float32 numbers.
    """
    values = np.asarray(row[field])
    if values.dtype.kind in "iu":
        x0, y0, w, h = (int(q) / BOX_SCALE for q in values.reshape(4))
    else:
        x0, y0, w, h = (float(v) for v in values.astype(np.float32).reshape(4))
    return x0, y0, w, h


def pixel_span(start: float, length: float, n: int, min_len: int) -> tuple[int, int]:
    """Integer (offset, length) of the normalised interval [start, start+length) on an n-pixel axis.

    Both edges round to the nearest pixel edge (half up) in float64, then are clamped into
    [0, n] with at least ``min_len`` pixels. Pure arithmetic, so it replays identically anywhere.
    """
    a = math.floor(start * n + 0.5)
    b = math.floor((start + length) * n + 0.5)
    a = min(max(a, 0), n - min_len)
    b = min(max(b, a + min_len), n)
    return a, b - a
