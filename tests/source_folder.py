"""The small image folder every interop test reads: PNGs of different sizes in three classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cat")
SIZE = 16


def make_folder(root: Path, per_class: int = 5) -> Path:
    """An image folder of PNGs of different sizes (train and val), 3 classes."""
    rng = np.random.RandomState(7)
    for split, count in (("train", per_class), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.randint(20, 60), rng.randint(20, 60)
                ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
                pixels = (ramp + rng.randint(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)
                pixels[..., c] //= 2
                Image.fromarray(pixels).save(root / split / name / f"{i:02d}.png")
    return root
