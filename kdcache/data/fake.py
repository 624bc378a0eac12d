"""The synthetic images of ``fake:N[:C[:S]]``: a counter-based hash, so every image is a pure function
of its index, the same on every machine, and a million of them are made in seconds.

Image ``i`` (test images: ``i + 10**9``) of side ``S`` is the first ``3·S·S`` bytes, little-endian, of the
64-bit words ``mix64(i·2**24 + j)`` for ``j = 0, 1, …``, laid out as ``[3, S, S]``; its label is
``mix64(i·2**24 + 2**24 - 1) mod C``. ``mix64`` is SplitMix64's output function (Steele et al. 2014):
``z = x + 0x9E3779B97F4A7C15; z = (z ^ z>>30)·0xBF58476D1CE4E5B9; z = (z ^ z>>27)·0x94D049BB133111EB;
z ^ z>>31``, all modulo 2**64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kdcache.data.images import Source
    from kdcache.data.spec import DatasetSpec

TEST_OFFSET = 10**9  # test image i is image i + TEST_OFFSET: never one of any fake:N's train images
_SLOT = 1 << 24  # counters per image: pixel words from 0, the label word last
_BLOCK = 1 << 15  # images per vectorised step: bounds the uint64 temporaries to a few MB per word column


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of uint64 counters (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def fake_images(first: int, count: int, side: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``first .. first+count-1`` as uint8 ``[count, 3, side, side]`` and their int64 labels."""
    size = 3 * side * side
    words = -(-size // 8)
    if words >= _SLOT:
        raise ValueError(f"fake images of side {side} are too large for the counter layout")
    images = np.empty((count, size), np.uint8)
    labels = np.empty(count, np.int64)
    offsets = np.arange(words, dtype=np.uint64)
    for start in range(0, count, _BLOCK):
        index = np.arange(first + start, first + min(start + _BLOCK, count), dtype=np.uint64)
        base = index * np.uint64(_SLOT)
        block = mix64(base[:, None] + offsets[None, :]).astype("<u8")
        images[start:start + len(index)] = block.view(np.uint8).reshape(len(index), -1)[:, :size]
        labels[start:start + len(index)] = (mix64(base + np.uint64(_SLOT - 1)) % np.uint64(classes)).astype(np.int64)
    return images.reshape(count, 3, side, side), labels


def open_fake(spec: DatasetSpec) -> Source:
    """``fake:N:C:S``: N train and max(N//4, 1) test images made by :func:`fake_images`."""
    import torch

    from kdcache.data.images import TensorImageSet, tensor_source

    n, c, s = spec.sizes

    def split(first: int, count: int) -> TensorImageSet:
        images, labels = fake_images(first, count, s, c)
        return TensorImageSet(torch.from_numpy(images), labels)

    train, test = split(0, n), split(TEST_OFFSET, max(n // 4, 1))
    return tensor_source(spec.text, train, test, tuple(str(k) for k in range(c)))
