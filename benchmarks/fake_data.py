"""fake_data: images per second of the ``fake:`` formula (kdcache/data/fake.py) against torchvision's FakeData,
which it replaced, side by side in one process, on one thread.

    python -m benchmarks.fake_data [--quick]
"""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.common import Clock, device, emit, median, parse_args, table
from kdcache.data.fake import fake_images

NAME = "fake_data"


def formula(count: int, side: int) -> float:
    clock = Clock()
    fake_images(0, count, side, 1000)
    return count / clock.read()[0]


def torchvision_fake(count: int, side: int) -> float:
    from torchvision.datasets import FakeData
    from torchvision.transforms.functional import pil_to_tensor

    data = FakeData(size=count, image_size=(3, side, side), num_classes=1000)
    clock = Clock()
    torch.stack([pil_to_tensor(data[i][0]) for i in range(count)])
    return count / clock.read()[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    torch.set_num_threads(1)
    count, old_count = (100_000, 200) if args.quick else (1_000_000, 1_000)
    rows = []
    for side in (8, 32):
        new = [formula(count, side) for _ in range(args.reps)]
        old = [torchvision_fake(old_count, side) for _ in range(max(1, args.reps // 2))]
        rows.append({"side": side, "images": count, "formula_images_per_s": median(new),
                     "FakeData_images_per_s": median(old), "speed-up": median(new) / median(old)})
    load = os.getloadavg()[0]
    text = (f"fake: images per second, one thread, load {load:.2f} (FakeData timed on {old_count} images)\n"
            + table(rows, ["side", "images", "formula_images_per_s", "FakeData_images_per_s", "speed-up"]))
    return emit(NAME, args, device("cpu"), {"load_average": load, "rows": rows}, text)


if __name__ == "__main__":
    main()
