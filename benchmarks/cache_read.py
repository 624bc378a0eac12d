"""cache_read: views/s the training reader decodes from a local cache, per logit mode and features.

For each cache (made once with a cheap teacher; what is measured is reading, not the teacher):

- ``block reader``: :class:`kdcache.student.reader.TrainViews` with ``batch_size`` and ``render=False`` —
  chunk-sized ``Cache.read_block`` calls, window shuffle, batches of teacher arrays and params;
- ``+ decode``: the same, then each batch turned into the float32 training target the trainer uses
  (``decode_logits`` for dense logits, ``Cache.teacher_probs`` for top-k/sampled) and features to
  float32;
- ``item reader``: the per-item stream with ``DataLoader(batch_size=...)`` default collation (the
  trainer's loader before batched reading);
- ``per-sample access``: one ``Cache.read_views`` call per sample and array (random order);
- ``image replay``: the batched reader with rendering — the bound of training on this machine —
  and the item reader with rendering and collation, for comparison.

views/s is wall-clock; views/CPU-s divides by the process CPU time (all threads), i.e. views/s
per core. Target: >= 50,000 views/s per core for the teacher-output path (block reader + decode).

    python -m benchmarks.cache_read [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import Clock, device, emit, median, parse_args, table
from kdcache import data, models
from kdcache.augment import Recipe
from kdcache.cache.logits import decode_logits
from kdcache.cache.store import Cache, open_cache
from kdcache.student.reader import TrainViews
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer

NAME = "cache_read"
TARGET = 50_000
BATCH = 256
AUGMENT = "rrc+flip"


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="read whole epochs until this long has passed (default 0.2 quick, 1 full)")


def caches(quick: bool) -> list[tuple[str, int, dict[str, Any]]]:
    """(label, classes, precompute overrides) of every cache read."""
    modes: list[tuple[str, dict[str, Any]]] = [
        ("dense float16", {}),
        ("dense bfloat16", {"logit_dtype": "bfloat16"}),
        ("topk:10", {"logits": "topk:10"}),
        ("sampled:50", {"logits": "sampled:50"}),
        ("dense + layer1:attention", {"features": ("layer1:attention",)}),
    ]
    if quick:
        return [(label, 100, o) for label, o in modes if label != "dense bfloat16"] + [("dense float16", 1000, {})]
    return [(label, classes, o) for classes in (100, 1000) for label, o in modes]


class Decoder:
    """The trainer's step from a batch of ``teacher/<array>`` tensors to float32 targets."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.targets = cache.target_arrays()
        self.features = [info["array"] for info in cache.feature_layers().values()]

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        block = {name: batch[f"teacher/{name}"].numpy() for name in self.targets}
        if self.cache.dense_logits:
            decode_logits(block["logits"], self.cache.logit_dtype)
        else:
            self.cache.teacher_probs(block)
        for name in self.features:
            batch[f"teacher/{name}"].float()


def stream(cache: Cache, source: data.Source, **options: Any) -> TrainViews:
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    renderer = Renderer(source.train, recipe, source.image_size, source.mean, source.std)
    arrays = cache.target_arrays() + ["energy"] + [i["array"] for i in cache.feature_layers().values()]
    return TrainViews(renderer, source.train.labels, cache.chunk_samples, int(cache.manifest["recipe"]["seed"]),
                      cache.path, arrays, cache.views, **options)


def timed_epochs(make: Callable[[int], Iterable[Any]], count: Callable[[Any], int], min_seconds: float,
                 each: Callable[[Any], None] | None = None) -> tuple[int, float, float]:
    """Read epoch after epoch until ``min_seconds`` passed: (views, wall seconds, CPU seconds)."""
    clock, views, epoch = Clock(), 0, 0
    while True:
        for batch in make(epoch):
            if each is not None:
                each(batch)
            views += count(batch)
        epoch += 1
        wall, cpu = clock.read()
        if wall >= min_seconds:
            return views, wall, cpu


def readers(cache: Cache, source: data.Source, min_seconds: float) -> dict[str, Callable[[], tuple[int, float, float]]]:
    decoder = Decoder(cache)
    batched = stream(cache, source, batch_size=BATCH, render=False)
    items = stream(cache, source, render=False)
    replay = stream(cache, source, batch_size=BATCH)
    replay_items = stream(cache, source)

    def epochs(s: TrainViews, loader: bool = False) -> Callable[[int], Iterable[Any]]:
        def make(epoch: int) -> Iterable[Any]:
            s.set_epoch(epoch)
            return DataLoader(s, batch_size=BATCH) if loader else s
        return make

    def per_sample() -> tuple[int, float, float]:
        rng = np.random.default_rng(0)
        n = 32
        indices, views = rng.integers(0, cache.num_samples, n), rng.integers(0, cache.views, n)
        names = [f"aug/{f}" for f in Recipe.from_manifest(cache.manifest["recipe"]["augment"]).fields()]
        names += stream(cache, source).teacher_arrays
        clock = Clock()
        for i, v in zip(indices, views):
            for name in names:
                cache.read_views(name, np.array([i]), np.array([v]))
        return (n, *clock.read())

    count = lambda batch: len(batch["label"])
    return {
        "block reader": lambda: timed_epochs(epochs(batched), count, min_seconds),
        "block reader + decode": lambda: timed_epochs(epochs(batched), count, min_seconds, decoder),
        "item reader + collate": lambda: timed_epochs(epochs(items, loader=True), count, min_seconds),
        "item reader + collate + decode": lambda: timed_epochs(epochs(items, loader=True), count, min_seconds, decoder),
        "per-sample access": per_sample,
        "image replay (block reader + render)": lambda: timed_epochs(epochs(replay), count, min_seconds / 3),
        "image replay (item reader + render + collate)":
            lambda: timed_epochs(epochs(replay_items, loader=True), count, min_seconds / 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, options)
    dev = device("cpu")  # reading is CPU work whatever the training device
    min_seconds = args.min_seconds or (0.2 if args.quick else 1.0)
    samples, views = (2048, 2) if args.quick else (8192, 4)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        for label, classes, overrides in caches(args.quick):
            dataset = f"fake:{samples}:{classes}"
            source = data.open_source(dataset)
            torch.manual_seed(0)
            weights = Path(tmp) / f"cnn{classes}.pt"
            if not weights.exists():
                torch.save(models.create_model("cnn", classes, source.channels).state_dict(), weights)
            path = precompute(PrecomputeConfig(dataset=dataset, teacher="cnn", weights=str(weights),
                                               out=str(Path(tmp) / "caches"), views=views, augment=AUGMENT,
                                               batch_size=512, progress=False, **overrides)).path
            cache = open_cache(path)
            runs = readers(cache, source, min_seconds)
            measured: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
            for _ in range(args.reps):
                for name, run in runs.items():
                    n, wall, cpu = run()
                    measured[name].append((n / wall, n / cpu))
            for name, pairs in measured.items():
                record = {"cache": label, "classes": classes, "chunk_samples": cache.chunk_samples, "reader": name,
                          "views_per_s": median(p[0] for p in pairs), "views_per_cpu_s": median(p[1] for p in pairs)}
                if name.startswith("block reader"):
                    record["meets_target"] = record["views_per_cpu_s"] >= TARGET
                rows.append(record)
                results.append({**record, "runs": pairs})
    text = (f"training reader throughput — fake data, {views} views, batch {BATCH}, local disk, "
            f"target {TARGET:,} views/s per core for the teacher-output path\n"
            + table(rows, ["cache", "classes", "chunk_samples", "reader", "views_per_s", "views_per_cpu_s",
                           "meets_target"]))
    return emit(NAME, args, dev, {"samples": samples, "views": views, "batch_size": BATCH, "target": TARGET,
                                  "results": results}, text)


if __name__ == "__main__":
    main()
