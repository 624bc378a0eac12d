"""train_throughput: images/s of student training (a) alone with CE, (b) from the cache with KD,
(c) with an online teacher (classic KD), all through the real ``kdcache.student.train.train``.

Targets: (b)/(a) >= 0.95, and (b)/(c) >= 0.95·(1 + t_T/t_S) where t_T is the teacher's forward
time and t_S the student's training-step time per image, both timed alone on an in-memory batch
(so 1 + t_T/t_S is what the cache saves when data loading costs nothing), measured after every
repetition so that each (b)/(c) is compared with a target taken under the same load. images/s is the trainer's
own figure for its last epoch (the loop only: evaluation and checkpoints excluded). The three
settings run interleaved; ratios are medians of per-repetition ratios (``_best``: ratio of the
fastest runs, the least disturbed on a shared machine). The data path alone (the
loader the trainer builds, iterated without a model) is timed too, to show what it adds.

    python -m benchmarks.train_throughput [--quick] [--device auto]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import device, emit, interleave, median, paired_ratio, parse_args, sync, table
from kdcache import data, models
from kdcache.augment import Recipe
from kdcache.cache.store import open_cache
from kdcache.student.config import TrainConfig
from kdcache.student.reader import TrainViews
from kdcache.student.train import train
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer

NAME = "train_throughput"
TARGET = 0.95
AUGMENT = "rrc+flip"


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", nargs="+", default=None,
                        help="TEACHER,STUDENT model pairs (default resnet8x4,resnet8; full mode adds "
                             "resnet32x4,resnet8x4)")
    parser.add_argument("--classes", type=int, default=100, help="classes of the fake dataset")
    parser.add_argument("--samples", type=int, default=None,
                        help="images of the fake dataset (default 512 with --quick, 2048 otherwise)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the trainer")


def step_times(teacher: torch.nn.Module, student: torch.nn.Module, batch: int, channels: int, classes: int,
               dev: torch.device, reps: int) -> tuple[float, float]:
    """(t_T, t_S): seconds per image of a teacher forward and of a student KD training step, alone."""
    x = torch.randn(batch, channels, 32, 32, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    target = torch.randn(batch, classes, device=dev).softmax(dim=1)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def forward() -> None:
        with torch.inference_mode():
            teacher(x)

    def step() -> None:
        logits = student(x)
        loss = F.cross_entropy(logits, y) + F.kl_div(F.log_softmax(logits / 4, dim=1), target, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(fn: Callable[[], None]) -> float:
        fn()
        sync(dev)
        out = []
        for _ in range(reps):
            began = time.perf_counter()
            fn()
            sync(dev)
            out.append(time.perf_counter() - began)
        return median(out) / batch

    times = {"t": [], "s": []}
    for _ in range(2):  # interleaved too
        times["t"].append(timed(forward))
        times["s"].append(timed(step))
    return median(times["t"]), median(times["s"])


def loader_rate(dataset: str, cache: str | None, batch: int, workers: int, epoch: int) -> tuple[int, float]:
    """(images, seconds) of one epoch of the training loader alone, built as the trainer builds it."""
    source = data.open_source(dataset)
    if cache is not None:
        c = open_cache(cache)
        recipe, seed = Recipe.from_manifest(c.manifest["recipe"]["augment"]), int(c.manifest["recipe"]["seed"])
        views, block = c.views, c.chunk_samples
        arrays = c.target_arrays()
    else:
        recipe, seed, views, block, arrays = Recipe.parse(AUGMENT), 0, None, 256, []
    renderer = Renderer(source.train, recipe, source.image_size, source.mean, source.std)
    stream = TrainViews(renderer, source.train.labels, block, seed, cache, arrays, views, batch_size=batch)
    stream.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    began = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    return n, time.perf_counter() - began


def trainer_rate(root: Path, config: dict[str, Any]) -> tuple[float, float]:
    """The trainer's own images/s for its last epoch (the loop only), as (images/s, 1 second)."""
    last = train(TrainConfig(out=tempfile.mkdtemp(dir=root), **config)).metrics[-1]
    return last["images_per_s"], 1.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, options)
    dev = device(args.device)
    samples, views, batch, epochs = (512, 2, 64, 2) if args.quick else (2048, 4, 128, 2)
    samples = args.samples or samples
    pairs = args.pairs or (["resnet8x4,resnet8"] if args.quick else ["resnet8x4,resnet8", "resnet32x4,resnet8x4"])
    dataset = f"fake:{samples}:{args.classes}"
    source = data.open_source(dataset)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        root = Path(tmp)
        for pair in pairs:
            teacher_spec, student_spec = pair.split(",")
            torch.manual_seed(0)
            teacher = models.create_model(teacher_spec, source.num_classes, source.channels)
            weights = str(root / "teacher.pt")
            torch.save(teacher.state_dict(), weights)
            cache = precompute(PrecomputeConfig(dataset=dataset, teacher=teacher_spec, weights=weights,
                                                out=str(root / "caches"), views=views, augment=AUGMENT,
                                                batch_size=batch, device=str(dev), progress=False)).path
            common = {"dataset": dataset, "model": student_spec, "epochs": epochs, "batch_size": batch,
                      "augment": AUGMENT, "workers": args.workers, "device": str(dev), "progress": False}
            settings = {
                "(a) student alone, CE": {"loss": "ce"},
                "(b) from the cache, KD": {"cache": cache, "loss": "kd"},
                "(c) online teacher, KD": {"online_teacher": teacher_spec, "teacher_weights": weights, "loss": "kd"},
            }
            runs = {name: partial(trainer_rate, root, common | o) for name, o in settings.items()}
            runs["data path alone, no cache"] = partial(loader_rate, dataset, None, batch, args.workers, epochs - 1)
            runs["data path alone, from cache"] = partial(loader_rate, dataset, cache, batch, args.workers, epochs - 1)
            teacher = teacher.to(dev).eval()
            student = models.create_model(student_spec, source.num_classes, source.channels).to(dev).train()
            rates: dict[str, list[float]] = {name: [] for name in runs}
            steps = []  # (t_T, t_S) measured right after each repetition's runs, under the same load
            for _ in range(args.reps):
                for name, measured in interleave(runs, 1).items():
                    rates[name] += measured
                steps.append(step_times(teacher, student, batch, source.channels, source.num_classes, dev, 5))
            a, b, c = (rates[name] for name in settings)
            t_ratio = [t / s for t, s in steps]
            limits = [TARGET * (1 + r) for r in t_ratio]
            summary = {
                "pair": pair, "t_T_ms": 1e3 * median(t for t, _ in steps), "t_S_ms": 1e3 * median(s for _, s in steps),
                "t_T/t_S": median(t_ratio), "b/a": paired_ratio(b, a), "b/a_target": TARGET,
                "b/c": paired_ratio(b, c), "b/c_target": median(limits),
                # per repetition, (b)/(c) over its own target: the comparison that shares one moment's load
                "b/c_over_target": paired_ratio([y / z for y, z in zip(b, c)], limits),
            }
            summary["b/a_best"], summary["b/c_best"] = max(b) / max(a), max(b) / max(c)
            summary["b/a_met"] = summary["b/a"] >= TARGET
            summary["b/c_met"] = summary["b/c_over_target"] >= 1.0
            data_b = median(rates["data path alone, from cache"])
            summary["data_path_ms_per_image"] = 1e3 / data_b
            results.append({**summary, "images_per_s": {name: median(r) for name, r in rates.items()},
                            "rates": rates})
            rows += [{"pair": pair, "setting": name, "images_per_s": median(r)} for name, r in rates.items()]
            print(f"{pair}: t_T {summary['t_T_ms']:.3f} ms, t_S {summary['t_S_ms']:.3f} ms per image, "
                  f"t_T/t_S {summary['t_T/t_S']:.2f}", flush=True)
    columns = ["pair", "t_T/t_S", "b/a", "b/a_best", "b/a_target", "b/a_met", "b/c", "b/c_best", "b/c_target",
               "b/c_over_target", "b/c_met"]
    ratio_rows = [{k: r[k] for k in columns} for r in results]
    text = (f"student training throughput — {dataset}, {views} cached views, batch {batch}, "
            f"{torch.get_num_threads()} threads, {args.workers} loader workers, {dev}\n"
            + table(rows, ["pair", "setting", "images_per_s"]) + "\n\n"
            + table(ratio_rows, columns))
    return emit(NAME, args, dev, {"dataset": dataset, "views": views, "batch_size": batch, "epochs": epochs,
                                  "results": results}, text)


if __name__ == "__main__":
    main()
