"""What imported caches cost: replaying Pillow-resized crops (``pilrrc``) beside torch's (``rrc``), and the
speed of ``kdcache export ml-dr`` and ``kdcache import ml-dr`` on a generated ImageNet-shaped folder.

    python -m benchmarks.interop            # 1,000 images x 4 views; replay of 256 views, 5 repetitions
    python -m benchmarks.interop --quick    # 200 images x 4 views, 3 repetitions

Replay: views/s on one thread of ``Recipe.apply`` at 224 px (the student's per-view work) for ``rrc+flip``
and ``pilrrc+flip`` on the same images and params, interleaved. Export and import: views/s of each
(import includes hashing every file for the cache id), on a ``pilrrc+flip`` top-k:5 cache of a cheap
``cnn`` teacher. Results: docs/benchmarks.md §9.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Run, device, emit, interleave_runs, median, parse_args, ratios, table
from benchmarks.data_sources import make_folder

SIZE = 224


def replay_rate(recipe_spec: str, images: list[torch.Tensor]) -> Run:
    from kdcache.augment import Recipe

    recipe = Recipe.parse(recipe_spec)
    params = recipe.sample(0, np.arange(len(images)), np.zeros(len(images), np.int64), len(images))
    began = time.perf_counter()
    for j, image in enumerate(images):
        recipe.apply(image, {k: v[j] for k, v in params.items()}, SIZE, interpolation="bilinear")
    return Run(len(images), time.perf_counter() - began)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from kdcache import data, models
    from kdcache.interop.imports import import_cache
    from kdcache.interop.mldr_export import export
    from kdcache.teacher.config import PrecomputeConfig
    from kdcache.teacher.precompute import precompute

    args = parse_args(__doc__.splitlines()[0], argv)
    n, views, replayed = (200, 4, 64) if args.quick else (1000, 4, 256)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        folder = make_folder(Path(tmp) / "images", n)
        source = data.open_source(f"imagefolder:{folder}")
        images = [source.train[i][0] for i in range(min(replayed, n))]
        runs = interleave_runs({spec: (lambda spec=spec: replay_rate(spec, images))
                                for spec in ("rrc+flip", "pilrrc+flip")}, args.reps)
        torch.save(models.create_model("cnn", source.num_classes, 3).state_dict(), Path(tmp) / "cnn.pt")
        made = precompute(PrecomputeConfig(dataset=source.spec, teacher="cnn", weights=str(Path(tmp) / "cnn.pt"),
                                           out=str(Path(tmp) / "c"), views=views, augment="pilrrc+flip",
                                           logits="topk:5", teacher_size=64, batch_size=256, progress=False))
        began = time.perf_counter()
        export(made.path, str(Path(tmp) / "exported"), progress=False)
        exported = Run(n * views, time.perf_counter() - began)
        began = time.perf_counter()
        import_cache("ml-dr", str(Path(tmp) / "exported"), source.spec, str(Path(tmp) / "i"), progress=False)
        imported = Run(n * views, time.perf_counter() - began)
    rows = [{"replay": spec, "views/s": median(r.rate for r in runs[spec]),
             "vs rrc": ratios(runs[spec], runs["rrc+flip"])["ratio"]} for spec in runs]
    result = {"images": n, "views": views, "replay": rows, "export_views_per_s": exported.rate,
              "import_views_per_s": imported.rate, "precompute_views_per_s": made.views_per_second}
    text = (f"{n:,} JPEGs (200-500 px) x {views} views; replay of {len(images)} views at {SIZE} px on one thread, "
            f"{args.reps} interleaved repetitions\n\n" + table(rows, ["replay", "views/s", "vs rrc"])
            + f"\n\nexport ml-dr {exported.rate:.0f} views/s, import ml-dr {imported.rate:.0f} views/s "
            f"(precompute of the same cache with a 64 px cnn teacher: {made.views_per_second:.0f} views/s)")
    return emit("interop", args, device("cpu"), result, text)


if __name__ == "__main__":
    main()
