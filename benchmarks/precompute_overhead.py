"""precompute_overhead: views/s of kdcache's precompute vs bare teacher inference on the same inputs.

For each teacher, the real :func:`kdcache.teacher.precompute.precompute` writes a real cache to a temporary
folder (weights file, hashing, rendering, teacher, targets, energies, features, Zarr writes); the
bare run feeds the very inputs precompute rendered (captured through ``on_batch`` and already on the
device) to the same model, batch size and threads under ``inference_mode``. Both are timed from the
end of their first batch to the end (steady state: setup, which a real run amortises over hours, is
reported separately). Variants run interleaved; ``ratio_to_bare`` is the median of per-repetition
ratios, ``ratio_best`` the ratio of the fastest runs, ``ratio_cpu`` the ratio of views per CPU-second
(process and DataLoader workers): on a shared machine the last two are the least disturbed. A
breakdown times the parts of one batch in isolation to say where any gap goes.

    python -m benchmarks.precompute_overhead [--quick] [--device auto]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Run, cpu_seconds, device, emit, interleave_runs, median, parse_args, ratios, sync, table
from kdcache import data, models
from kdcache.augment import Recipe
from kdcache.cache.arrays import ArraySpec
from kdcache.cache.store import create_cache, open_cache
from kdcache.teacher.config import PrecomputeConfig
from kdcache.cache.logits import parse_logits
from kdcache.teacher.outputs import energy, teacher_targets
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer

NAME = "precompute_overhead"
TARGET = 0.95
TEACHERS = {"torchvision:resnet50": "layer3", "resnet8x4": "layer3"}


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), help="teacher model specs")
    parser.add_argument("--classes", type=int, default=100, help="classes of the fake dataset")
    parser.add_argument("--samples", type=int, default=None,
                        help="images of the fake dataset (default 256 with --quick, 1024 otherwise)")
    parser.add_argument("--workers", type=int, default=1,
                        help="DataLoader workers of the 'rendering in workers' variant")


def variants(layer: str, workers: int, quick: bool) -> dict[str, dict[str, Any]]:
    """Precompute settings measured against bare inference: name -> PrecomputeConfig overrides.

    ``--quick`` runs each output setting once, with kdcache's default data path (``workers=None``:
    rendering on a background thread on a CPU, in DataLoader workers beside a GPU). The full run
    measures more outputs, each with ``workers=0`` (the background thread) and with views rendered
    in ``workers`` DataLoader worker processes.
    """
    outputs: dict[str, dict[str, Any]] = {"dense": {}}
    if quick:  # top-k with each feature path that matters: the default (attention) and full maps
        outputs[f"topk:10 + {layer}:attention"] = {"logits": "topk:10", "features": (f"{layer}:attention",)}
        outputs[f"topk:10 + {layer}:full"] = {"logits": "topk:10", "features": (f"{layer}:full",)}
        return {name: {**overrides, "workers": None} for name, overrides in outputs.items()}
    outputs |= {
        "topk:10": {"logits": "topk:10"},
        "sampled:50": {"logits": "sampled:50"},
        f"dense + {layer}:full": {"features": (f"{layer}:full",)},
        f"dense + {layer}:attention": {"features": (f"{layer}:attention",)},
    }
    pipelined = f"{workers} worker{'s' * (workers != 1)}"
    out = {}
    for name, overrides in outputs.items():
        out[name] = {**overrides, "workers": 0}
        out[f"{name}, {pipelined}"] = {**overrides, "workers": workers}
    return out


class Teacher:
    """One teacher under test: its weights file, the rendered inputs, and the runs that time it."""

    def __init__(self, spec: str, dataset: str, views: int, batch: int, dev: torch.device, root: Path):
        self.spec, self.dataset, self.views, self.batch, self.dev, self.root = spec, dataset, views, batch, dev, root
        source = data.open_source(dataset)
        torch.manual_seed(0)
        self.model = models.create_model(spec, source.num_classes, source.channels)
        self.weights = str(root / f"{spec.replace(':', '_')}.pt")
        torch.save(self.model.state_dict(), self.weights)
        self.model = self.model.to(dev).eval()
        self.inputs: list[torch.Tensor] = []
        self.setup_seconds: list[float] = []
        self.cache_path = ""
        self.run_precompute({}, capture=True)  # warm-up, and the inputs of the bare runs
        self.inputs = [x.to(dev) for x in self.inputs]

    def config(self, out: str, **overrides: Any) -> PrecomputeConfig:
        return PrecomputeConfig(dataset=self.dataset, teacher=self.spec, weights=self.weights, out=out,
                                views=self.views, batch_size=self.batch, device=str(self.dev), progress=False,
                                **overrides)

    def run_precompute(self, overrides: dict[str, Any], capture: bool = False) -> Run:
        """Views after the first batch, and seconds from the end of the first batch to the end of the run."""
        out = tempfile.mkdtemp(dir=self.root)
        first: list[tuple[float, float, int]] = []

        def on_batch(inputs: torch.Tensor, logits: torch.Tensor) -> None:
            if capture:
                self.inputs.append(inputs.clone())
            if not first:
                sync(self.dev)
                first.append((time.perf_counter(), cpu_seconds(), len(inputs)))

        began = time.perf_counter()
        result = precompute(self.config(out, **overrides), on_batch=on_batch)
        end, end_cpu = time.perf_counter(), cpu_seconds()
        if capture:
            self.cache_path = result.path  # kept: the breakdown times rewriting its first shard
        else:
            shutil.rmtree(out)
        (t_first, cpu_first, n_first), = first
        self.setup_seconds.append(t_first - began)
        return Run(result.views_computed - n_first, end - t_first, end_cpu - cpu_first)

    @torch.inference_mode()
    def run_bare(self) -> Run:
        """Bare inference over the captured inputs, timed like :meth:`run_precompute`."""
        self.model(self.inputs[0])
        sync(self.dev)
        began, began_cpu = time.perf_counter(), cpu_seconds()
        for x in self.inputs[1:]:
            self.model(x)
        sync(self.dev)
        return Run(sum(len(x) for x in self.inputs[1:]), time.perf_counter() - began, cpu_seconds() - began_cpu)

    @torch.inference_mode()
    def breakdown(self, variant: dict[str, Any]) -> dict[str, float]:
        """Milliseconds per view of each part of precompute's work, each timed alone on one batch."""
        source = data.open_source(self.dataset)
        recipe = Recipe.parse("rrc+flip")
        renderer = Renderer(source.train, recipe, source.image_size, source.mean, source.std)
        pairs = np.arange(self.batch, dtype=np.int64)
        indices, views = pairs // self.views, pairs % self.views

        def render() -> None:  # what precompute does per batch: sample params, replay every view into one batch
            renderer.batch(indices, recipe.sample(0, indices, views, len(source.train)))

        x = self.inputs[0]
        logits = self.model(x).float()
        entry = parse_logits(variant.get("logits", "dense"), source.num_classes, "float16")
        uniforms = torch.rand(len(x), entry.get("draws", 1), device=self.dev, dtype=torch.float64)

        def outputs() -> None:
            teacher_targets(logits, entry, uniforms)
            energy(logits, (1.0, 4.0)).cpu().numpy()

        def forward() -> None:
            self.model(x)
            sync(self.dev)

        parts = {"render (main process)": render, "teacher forward": forward, "targets + energy": outputs}
        out = {name: 1e3 * _best_of(fn, 5) / len(x) for name, fn in parts.items()}
        out["zarr write of a shard"] = self.write_ms_per_view()
        return out

    def write_ms_per_view(self) -> float:
        """Milliseconds per view of ``Cache.write_shard`` for the first shard of the warm-up cache."""
        cache = open_cache(self.cache_path)
        specs = [ArraySpec(a["name"], tuple(a["tail"]), a["dtype"], a.get("logical"))
                 for a in cache.manifest["layout"]["arrays"]]
        start, stop = cache.shard_range(0)
        arrays = {name: cache.read_samples(name, start, stop) for name in cache.array_names}
        times = []
        for _ in range(3):
            copy = create_cache(tempfile.mkdtemp(dir=self.root), cache.manifest, cache.labels(), specs,
                                chunk_samples=cache.chunk_samples)
            began = time.perf_counter()
            copy.write_shard(0, arrays)
            times.append(time.perf_counter() - began)
        return 1e3 * min(times) / ((stop - start) * cache.views)


def _best_of(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, options)
    dev = device(args.device)
    samples, views, batch = (256, 2, 64) if args.quick else (1024, 4, 128)
    samples = args.samples or samples
    dataset = f"fake:{samples}:{args.classes}"
    data.open_source(dataset)  # materialise the images before any clock starts
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        for spec in args.teachers:
            layer = TEACHERS.get(spec, "layer3")
            teacher = Teacher(spec, dataset, views, batch, dev, Path(tmp))
            settings = variants(layer, args.workers, args.quick)
            runs: dict[str, Callable[[], Run]] = {"bare inference": teacher.run_bare}
            runs |= {name: partial(teacher.run_precompute, o) for name, o in settings.items()}
            measured = interleave_runs(runs, args.reps)
            bare = measured["bare inference"]
            split = teacher.breakdown({})
            for name, mine in measured.items():
                ratio = ratios(mine, bare)
                is_bare = name == "bare inference"
                record = {"teacher": spec, "variant": name, "views_per_s": median(r.rate for r in mine),
                          "views_per_cpu_s": median(r.cpu_rate for r in mine),
                          "ratio_to_bare": ratio["ratio"], "ratio_best": ratio["ratio_best"],
                          "ratio_cpu": ratio["ratio_cpu"], "target": None if is_bare else TARGET,
                          "meets_target": None if is_bare else ratio["ratio"] >= TARGET,
                          "runs": [[r.items, r.wall, r.cpu] for r in mine]}
                results.append(record)
                rows.append(record)
            results.append({"teacher": spec, "variant": "breakdown (ms/view, parts timed alone)", "parts": split,
                            "setup_seconds_median": median(teacher.setup_seconds)})
            print(f"{spec}: breakdown ms/view " + ", ".join(f"{k} {v:.3f}" for k, v in split.items())
                  + f"; setup before the first batch {median(teacher.setup_seconds):.2f} s", flush=True)
    text = (f"precompute vs bare teacher inference — {dataset}, {views} views, batch {batch}, "
            f"{torch.get_num_threads()} threads, {dev}\n"
            + table(rows, ["teacher", "variant", "views_per_s", "ratio_to_bare", "ratio_best", "ratio_cpu", "target",
                         "meets_target"]))
    return emit(NAME, args, dev, {"dataset": dataset, "views": views, "batch_size": batch, "results": results}, text)


if __name__ == "__main__":
    main()
