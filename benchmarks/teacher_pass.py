"""Teacher pass: views/s of extend (new views) and of the energy-guided extra views, against precompute's.

All three writers go through the one teacher pass (kdcache/teacher/passes.py), so each should run at
precompute's pipelined speed: the targets are extend ÷ precompute and extra views ÷ precompute ≥ 0.95.
Variants are interleaved (A, B, C, A, B, C, …) in one process; ratios are of medians.

    python -m benchmarks.teacher_pass --quick --threads 1 [--teacher cnn]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Run, cpu_seconds, device, emit, interleave_runs, median, parse_args, table
from kdcache import PrecomputeConfig, models, precompute
from kdcache.teacher import extra_views
from kdcache.teacher.extend import extend

NAME = "teacher_pass"


def _timed_extra_views(seconds: list[float]):
    """``add_extra_views`` that records how long it ran (precompute calls it after the regular shards)."""
    real = extra_views.add_extra_views

    def wrapper(*args: Any, **kwargs: Any) -> int:
        began = time.perf_counter()
        count = real(*args, **kwargs)
        seconds.append(time.perf_counter() - began)
        return count

    return real, wrapper


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, lambda p: p.add_argument(
        "--teacher", default="resnet8x4", help="teacher model spec, randomly initialised (cnn: rendering matters)"))
    teacher = args.teacher
    dev = device(args.device)
    n, views = (512, 2) if args.quick else (2048, 4)
    dataset = f"fake:{n}"
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-pass-"))
    torch.manual_seed(0)
    weights = work / "teacher.pt"
    torch.save(models.create_model(teacher, 10, 3).state_dict(), weights)
    base = dict(dataset=dataset, teacher=teacher, weights=str(weights), views=views, batch_size=128,
                device=str(dev), progress=False)
    seed_cache = precompute(PrecomputeConfig(out=str(work / "seed"), **base)).path
    count = [0]

    def fresh(name: str) -> str:
        count[0] += 1
        return str(work / f"{name}-{count[0]}")

    def run_precompute() -> Run:
        began, cpu = time.perf_counter(), cpu_seconds()
        result = precompute(PrecomputeConfig(out=fresh("pre"), **base))
        return Run(result.views_computed, time.perf_counter() - began, cpu_seconds() - cpu)

    def run_extend() -> Run:
        root = Path(fresh("ext"))
        root.mkdir()
        copy = root / Path(seed_cache).name
        shutil.copytree(seed_cache, copy)
        began, cpu = time.perf_counter(), cpu_seconds()
        result = extend(str(copy), views=2 * views, weights=[str(weights)], batch_size=128, device=str(dev),
                        progress=False)
        return Run(result.views_computed, time.perf_counter() - began, cpu_seconds() - cpu)

    def run_extra_views() -> Run:
        seconds: list[float] = []
        real, wrapper = _timed_extra_views(seconds)
        extra_views.add_extra_views = wrapper
        try:
            result = precompute(PrecomputeConfig(out=fresh("extra"), extra_views=f"0.5:{views}", **base))
        finally:
            extra_views.add_extra_views = real
        extra = result.manifest["he"]["samples"] * result.manifest["he"]["views"]
        return Run(extra, seconds[0])

    runs = interleave_runs({"precompute": run_precompute, "extend --views": run_extend,
                            "extra views": run_extra_views}, args.reps)
    shutil.rmtree(work, ignore_errors=True)
    rates = {name: median(r.rate for r in measured) for name, measured in runs.items()}
    results = [{"writer": name, "views_per_s": round(rates[name], 1),
                "ratio_to_precompute": round(rates[name] / rates["precompute"], 3),
                "runs_views_per_s": [round(r.rate, 1) for r in measured]} for name, measured in runs.items()]
    text = table(results, ["writer", "views_per_s", "ratio_to_precompute"])
    return emit(NAME, args, dev, {"dataset": dataset, "teacher": teacher, "views": views, "results": results}, text)


if __name__ == "__main__":
    main()
