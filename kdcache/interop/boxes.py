"""Pixel boxes of other systems as kdcache's stored boxes, checked to replay the very same pixels.

Other systems record a crop as integer pixels of one image (``top, left, height, width``); kdcache
stores an ``rrc`` box as uint16 fractions of the side (kdcache/augment/op.py) and finds the pixels
again with ``pixel_span``. Each conversion here picks the stored value nearest the pixel edge and then
replays it with the same arithmetic as the ops do, refusing any box that would not come back whole.
Boxes on the output view (erasing, CutMix) are stored as float32 fractions of the view's side.
"""

from __future__ import annotations

import numpy as np

from kdcache.augment.op import BOX_SCALE
from kdcache.errors import DataCorrupt, InvalidSpec


def integers(values: object, where: str, what: str) -> np.ndarray:
    """``values`` as int64, refused (one line naming ``where`` and ``what``) unless every one is an integer:
    not a bool, not a fraction, not text."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values.astype(np.int64)
    array = np.asarray(values, dtype=object)
    flat = array.reshape(-1)
    ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in flat)
    if not ok:
        bad = next(v for v in flat if not (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))))
        raise DataCorrupt(f"{where}: {what} holds {bad!r}, not an integer — the source is damaged")
    return array.astype(np.int64)


def spans(start: np.ndarray, length: np.ndarray, n: np.ndarray, min_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``pixel_span`` on arrays of float64 fractions: the integer (offset, length) each replay uses."""
    a = np.floor(start * n + 0.5)
    b = np.floor((start + length) * n + 0.5)
    a = np.minimum(np.maximum(a, 0), n - min_len)
    b = np.minimum(np.maximum(b, a + min_len), n)
    return a.astype(np.int64), (b - a).astype(np.int64)


def crop_boxes(top: np.ndarray, left: np.ndarray, height: np.ndarray, width: np.ndarray, image_h: np.ndarray,
               image_w: np.ndarray, where: str) -> np.ndarray:
    """Pixel crops (int arrays of one shape) as stored ``rrc`` boxes ``[..., 4]`` uint16 that replay them exactly.

    ``where`` names the views in an error (``"ml-dr sample 12"``). A crop outside its image means the
    dataset is not the one the source was made from.
    """
    top, left, height, width = (integers(v, where, "a crop") for v in (top, left, height, width))
    image_h, image_w = (np.broadcast_to(np.asarray(v, dtype=np.int64), top.shape) for v in (image_h, image_w))
    outside = (top < 0) | (left < 0) | (height < 1) | (width < 1) | (top + height > image_h) | (left + width > image_w)
    if outside.any():
        at = np.argwhere(outside)[0]
        raise DataCorrupt(f"{where}: a crop {int(width[tuple(at)])}x{int(height[tuple(at)])} at "
                          f"({int(left[tuple(at)])}, {int(top[tuple(at)])}) lies outside its image of "
                          f"{int(image_w[tuple(at)])}x{int(image_h[tuple(at)])} px — pass the --dataset the "
                          "source was made from, in its order")
    if (image_w > BOX_SCALE).any() or (image_h > BOX_SCALE).any():
        raise InvalidSpec(f"{where}: an image is wider or taller than {BOX_SCALE} px, finer than kdcache's stored "
                          "boxes — resize the dataset's images")
    x0, x1 = _nearest(left, image_w), _nearest(left + width, image_w)
    y0, y1 = _nearest(top, image_h), _nearest(top + height, image_h)
    box = np.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)
    got_left, got_width = spans(box[..., 0] / BOX_SCALE, box[..., 2] / BOX_SCALE, image_w, 1)
    got_top, got_height = spans(box[..., 1] / BOX_SCALE, box[..., 3] / BOX_SCALE, image_h, 1)
    if not ((got_left == left).all() and (got_width == width).all() and (got_top == top).all()
            and (got_height == height).all()):
        raise InvalidSpec(f"{where}: a crop does not replay whole from kdcache's uint16 box — it cannot be imported")
    return box.astype(np.uint16)


def _nearest(edge: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The uint16 step nearest pixel edge ``edge`` of an ``n``-pixel side."""
    return np.rint(edge * BOX_SCALE / n).astype(np.int64)


def view_boxes(top: np.ndarray, left: np.ndarray, height: np.ndarray, width: np.ndarray, size: int,
               where: str) -> np.ndarray:
    """Pixel boxes of a ``size`` x ``size`` view as float32 fractions ``[..., 4]`` (x0, y0, w, h) whose edges
    round back to those pixels (``pixel_span`` at the view's side, and CutMix's lattice of ``size`` steps)."""
    top, left, height, width = (integers(v, where, "a box") for v in (top, left, height, width))
    if ((top < 0) | (left < 0) | (height < 0) | (width < 0) | (top + height > size) | (left + width > size)).any():
        raise DataCorrupt(f"{where}: a box lies outside the {size}x{size} view — the source is damaged")
    box = (np.stack([left, top, width, height], axis=-1) / size).astype(np.float32)
    exact = box.astype(np.float64)
    for start, length, pixels, extent in ((exact[..., 0], exact[..., 2], left, width),
                                         (exact[..., 1], exact[..., 3], top, height)):
        got, got_len = spans(start, length, np.int64(size), 0)
        lattice = np.rint(start * size), np.rint((start + length) * size)
        if not ((got == pixels).all() and (got_len == extent).all() and (lattice[0] == pixels).all()
                and (lattice[1] == pixels + extent).all()):
            raise InvalidSpec(f"{where}: a box does not replay whole from float32 fractions — it cannot be imported")
    return box
