"""Decoding image bytes: Pillow for every format, and JPEGs at reduced size through libjpeg-turbo's DCT
scaling (simplejpeg, kdcache[decode]) where a view's crop allows it (kdcache/views.py)."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
from PIL import Image

from kdcache.extras import require

#: (full width, full height) -> the smallest (width, height) a reduced decode must keep.
Reduce = Callable[[int, int], tuple[int, int]]


def decode_bytes(data: bytes, mode: str, reduce: Reduce | None = None) -> torch.Tensor:
    """An encoded image as uint8 [C,H,W] in ``mode`` (``L`` or ``RGB``); a JPEG reduced as ``reduce``
    asks (see :meth:`ImageSet.load`), anything else, or a JPEG libjpeg-turbo cannot scale, decoded
    whole by Pillow."""
    if reduce is not None and data[:2] == b"\xff\xd8":
        scaled = _scaled_jpeg(data, mode, reduce)
        if scaled is not None:
            return scaled
    return decode_image(Image.open(io.BytesIO(data)), mode)


def _scaled_jpeg(data: bytes, mode: str, reduce: Reduce) -> torch.Tensor | None:
    simplejpeg = require("simplejpeg", "decode", "--decode reduced")
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        min_width, min_height = reduce(width, height)
        if min_width >= width and min_height >= height:
            return None
        pixels = simplejpeg.decode_jpeg(data, "GRAY" if mode == "L" else "RGB", min_width=min_width,
                                        min_height=min_height)
    except ValueError:  # CMYK and other layouts libjpeg-turbo will not scale: decode them whole
        return None
    pixels = np.ascontiguousarray(pixels).reshape(pixels.shape[0], pixels.shape[1], -1)
    return torch.from_numpy(pixels).permute(2, 0, 1)


#: What Pillow and simplejpeg raise for bytes that are not a decodable image.
UNDECODABLE = (OSError, SyntaxError, ValueError, TypeError)


def header(data: bytes) -> tuple[str, int]:
    """(PIL mode, shorter side) of an encoded image, from its header alone: what a source needs of its
    first image to choose gray or RGB and its native size."""
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, min(image.size)


def decode_image(image: Image.Image, mode: str) -> torch.Tensor:
    """An opened PIL image as uint8 [C,H,W] in ``mode``."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image.convert(mode))
