"""Decoding image bytes: Pillow for every format, and JPEGs at reduced size through libjpeg-turbo's DCT
scaling (simplejpeg, kdcache[decode]) where a view's crop allows it (kdcache/views.py)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from kdcache.extras import require

#: (full width, full height) -> the smallest (width, height) a reduced decode must keep.
Reduce = Callable[[int, int], tuple[int, int]]

#: The most pixels an image may have before it is decoded (Pillow's own limit for its error, about 179 M):
#: a few hundred bytes of PNG header can declare 50000x50000 px. The environment variable raises it.
MAX_PIXELS_VARIABLE = "KDCACHE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2 * 89_478_485


def max_pixels() -> int:
    """The pixel limit: ``$KDCACHE_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    try:
        return int(os.environ.get(MAX_PIXELS_VARIABLE, DEFAULT_MAX_PIXELS))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def check_size(width: int, height: int) -> None:
    """Refuse, before decoding, an image of more than :func:`max_pixels` pixels (ValueError: the callers'
    undecodable image)."""
    limit = max_pixels()
    if width * height > limit:
        raise ValueError(f"it declares {width}x{height} = {width * height:,} pixels, more than {limit:,} "
                         f"({MAX_PIXELS_VARIABLE}; raise it if the image is real)")


def file_header(path: Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (width, height)) of an image file from its header; ValueError for one that is not an image or
    declares more pixels than allowed (:func:`check_size`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                mode, size = image.mode, image.size
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{exc} ({MAX_PIXELS_VARIABLE}, and Pillow's PIL.Image.MAX_IMAGE_PIXELS)") from None
    check_size(*size)
    return mode, size


def open_image(data: bytes) -> Image.Image:
    """Pillow's image of ``data``, its header read and its size checked (:func:`check_size`), nothing decoded;
    Pillow's own decompression-bomb warning and error become that one check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{exc} ({MAX_PIXELS_VARIABLE}, and Pillow's PIL.Image.MAX_IMAGE_PIXELS)") from None
    check_size(*image.size)
    return image


def decode_bytes(data: bytes, mode: str, reduce: Reduce | None = None) -> torch.Tensor:
    """An encoded image as uint8 [C,H,W] in ``mode`` (``L`` or ``RGB``); a JPEG reduced as ``reduce``
    asks (see :meth:`ImageSet.load`), anything else, or a JPEG libjpeg-turbo cannot scale, decoded
    whole by Pillow."""
    if reduce is not None and data[:2] == b"\xff\xd8":
        scaled = _scaled_jpeg(data, mode, reduce)
        if scaled is not None:
            return scaled
    return decode_image(open_image(data), mode)


def _scaled_jpeg(data: bytes, mode: str, reduce: Reduce) -> torch.Tensor | None:
    simplejpeg = require("simplejpeg", "decode", "--decode reduced")
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    check_size(width, height)
    try:
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
    with open_image(data) as image:
        return image.mode, min(image.size)


def decode_image(image: Image.Image, mode: str) -> torch.Tensor:
    """An opened PIL image as uint8 [C,H,W] in ``mode`` (its size checked first, :func:`check_size`)."""
    from torchvision.transforms.functional import pil_to_tensor

    check_size(*image.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return pil_to_tensor(image.convert(mode))
