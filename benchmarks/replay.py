"""What replaying another library's augmentation costs beside running that library: views/s on one thread.

    python -m benchmarks.replay            # 256 views per variant, 5 interleaved repetitions
    python -m benchmarks.replay --quick    # 64 views, 3 repetitions
    python -m benchmarks --only replay     # the same, through the runner

Three pairs, each on the same decoded images (200-500 px JPEGs) at 224 px, kdcache from its uint8 tensors and
the library from its PIL images, as each reads them:
- ml-dr's RandAugment views (``pilrrc+flip+pilra``, recorded steps) beside torchvision's
  ``RandomResizedCrop + RandomHorizontalFlip + RandAugment + ToTensor`` on the PIL image (what ml-dr's reader
  runs up to its erasing; both end in a float tensor in [0, 1]);
- a seeded timm recipe (``timm:rand-m9-mstd0.5-inc1,re=0.25,remode=pixel,interp=bicubic``) beside timm's own
  ``create_transform`` of the same arguments;
- a TinyViT view (``pilrrc+flip+timmra+noiseerase``: its default config's draws, stored) beside timm's transform
  of that config (TinyViT's augmentation is a copy of timm's).
The target (issue 30) is a ratio of at least 0.9. Results: docs/benchmarks.md §12.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import Run, device, emit, interleave_runs, median, parse_args, ratios, table
from benchmarks.data_sources import make_folder

SIZE = 224
TIMM = "rand-m9-mstd0.5-inc1"


def timed(render: Callable[[int], Any], count: int) -> Run:
    began = time.perf_counter()
    for j in range(count):
        render(j)
    return Run(count, time.perf_counter() - began)


def recorded_randaugment(images: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """``pilrrc+flip+pilra`` params of one view per image, drawn as ml-dr's writer draws them (torchvision's
    RandAugment space at the view's size, magnitude bin 9, random signs)."""
    from torchvision import transforms as T

    from kdcache.augment import Recipe

    rng = np.random.default_rng(0)
    crop = Recipe.parse("rrc+flip").sample(0, np.arange(len(images)), np.zeros(len(images), np.int64), len(images))
    space = T.RandAugment()._augmentation_space(31, (SIZE, SIZE))
    names = list(space)
    steps = np.zeros((len(images), 2, 2))
    for j in range(len(images)):
        for k in range(2):
            op = int(rng.integers(len(names)))
            table, signed = space[names[op]]
            magnitude = float(table[9]) if table.ndim else 0.0
            steps[j, k] = (op, -magnitude if signed and rng.integers(2) else magnitude)
    return {**crop, "pilra": steps}


def tinyvit_params(images: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """The stored arrays of TinyViT's default-config views, one per image, from random seeds."""
    from kdcache.interop.boxes import crop_boxes
    from kdcache.interop.tinyvit import Augmentation, draw_view
    from kdcache.interop.tinyvit_draws import RandAugmentConfig

    aug = Augmentation(SIZE, "bicubic", RandAugmentConfig.parse(TIMM), 0.25, "pixel", 1)
    rows = [draw_view(seed, int(im.shape[-1]), int(im.shape[-2]), aug) for seed, im in enumerate(images)]
    boxes = np.stack([r["crop"] for r in rows])
    rrc = crop_boxes(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], np.array([im.shape[-2] for im in images]),
                     np.array([im.shape[-1] for im in images]), "benchmark")
    return {"rrc": rrc, **{key: np.stack([r[key] for r in rows]) for key in ("flip", "timmra", "noiseerase")}}


def variants(images: list[torch.Tensor], pils: list[Any]) -> dict[str, Callable[[], Run]]:
    """Name -> one timed pass over the images."""
    from timm.data import create_transform
    from torchvision import transforms as T

    from kdcache.augment import Recipe

    n = len(images)
    mldr = Recipe.parse("pilrrc:0.08:1:2+flip+pilra")  # as imports replay: Pillow 9.5-12.2 resize order
    mldr_params = recorded_randaugment(images)
    torchvision_ra = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.RandAugment(), T.ToTensor()])
    seeded = Recipe.parse(f"timm:{TIMM},re=0.25,remode=pixel,interp=bicubic")
    seeded_params = seeded.sample(0, np.arange(n), np.zeros(n, np.int64), n)
    timm_own = create_transform(SIZE, is_training=True, auto_augment=TIMM, re_prob=0.25, re_mode="pixel",
                                interpolation="bicubic")
    tinyvit = Recipe.parse("pilrrc:0.08:1:2+flip+timmra+noiseerase")
    tinyvit_rows = tinyvit_params(images)

    def row(params: dict[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
        return {k: v[j] for k, v in params.items()}

    def timm_view(j: int) -> Any:
        while True:  # timm 1.0 asks Pillow >= 11 for 0-bit posterize, which it refuses: draw again, as replay does
            try:
                return timm_own(pils[j])
            except ValueError:
                continue

    return {
        "ml-dr pilra replay": lambda: timed(lambda j: mldr.apply(images[j], row(mldr_params, j), SIZE), n),
        "torchvision RandAugment": lambda: timed(lambda j: torchvision_ra(pils[j]), n),
        "timm recipe replay": lambda: timed(lambda j: seeded.apply(images[j], row(seeded_params, j), SIZE), n),
        "timm create_transform": lambda: timed(timm_view, n),
        "TinyViT view replay": lambda: timed(lambda j: tinyvit.apply(images[j], row(tinyvit_rows, j), SIZE,
                                                                     interpolation="bicubic"), n),
    }


PAIRS = (("ml-dr pilra replay", "torchvision RandAugment"), ("timm recipe replay", "timm create_transform"),
         ("TinyViT view replay", "timm create_transform"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from kdcache import data
    from kdcache.augment.op import to_pil

    args = parse_args(__doc__.splitlines()[0], argv)
    count = 64 if args.quick else 256
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        source = data.open_source(f"imagefolder:{make_folder(Path(tmp) / 'images', count)}")
        images = [source.train[i][0] for i in range(count)]
    pils = [to_pil(im) for im in images]
    runs = interleave_runs(variants(images, pils), args.reps)
    rows = [{"replay": ours, "views/s": median(r.rate for r in runs[ours]), "library": theirs,
             "library views/s": median(r.rate for r in runs[theirs]), **ratios(runs[ours], runs[theirs])}
            for ours, theirs in PAIRS]
    text = (f"{count} JPEGs (200-500 px) at {SIZE} px, one thread, {args.reps} interleaved repetitions; ratio = "
            "replay / library views/s (target >= 0.9)\n\n"
            + table(rows, ["replay", "views/s", "library", "library views/s", "ratio", "ratio_best"]))
    return emit("replay", args, device("cpu"), {"views": count, "rows": rows}, text)


if __name__ == "__main__":
    main()
