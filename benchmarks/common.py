"""What every benchmark shares: options, the machine record, interleaved timing, tables, JSON output.

A benchmark measures ratios side by side in one process. On a shared machine the load changes
from second to second, so the variants are run interleaved (A, B, A, B, ...) and a ratio is the
median of the ratios of adjacent runs, which cancels slow drifts of the load; the ratio of the best
runs and the ratio of CPU-time rates are recorded beside it (see :func:`ratios`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every benchmark takes: --quick, --reps, --device, --threads, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole suite in under 5 minutes")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per variant "
                        "(default 3 with --quick, 5 otherwise)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the JSON results")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(dev: torch.device) -> None:
    """Wait for queued GPU work, so that a clock reading means what it says."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine(dev: torch.device) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, GPU, versions, load when the run began."""
    import numpy
    import zarr

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "device": str(dev),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


@dataclass(frozen=True)
class Run:
    """One timed run: items done, wall seconds, CPU seconds of this process and its reaped children."""

    items: int
    wall: float
    cpu: float = float("nan")

    @property
    def rate(self) -> float:
        return self.items / self.wall

    @property
    def cpu_rate(self) -> float:
        return self.items / self.cpu


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (every thread) and by its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def interleave(variants: dict[str, Callable[[], tuple[int, float]]], reps: int) -> dict[str, list[float]]:
    """Run every variant ``reps`` times in turn (A, B, A, B, ...); each call returns (items, seconds).

    Returns items/s of every run of every variant, in run order.
    """
    runs = interleave_runs({name: (lambda run=run: Run(*run())) for name, run in variants.items()}, reps)
    return {name: [r.rate for r in measured] for name, measured in runs.items()}


def interleave_runs(variants: dict[str, Callable[[], Run]], reps: int) -> dict[str, list[Run]]:
    """Like :func:`interleave` for variants that return a :class:`Run`; returns every run in order."""
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            runs[name].append(run())
    return runs


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repetitions of numerator[r] / denominator[r]: robust to the machine's load drifting."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def ratios(numerator: Sequence[Run], denominator: Sequence[Run]) -> dict[str, float]:
    """Throughput ratio three ways: median of per-repetition wall ratios (robust to slow drifts of the
    load), ratio of the best runs (the least disturbed), and ratio of CPU-time rates (work per item,
    blind to waiting for a CPU)."""
    out = {
        "ratio": paired_ratio([a.rate for a in numerator], [b.rate for b in denominator]),
        "ratio_best": max(a.rate for a in numerator) / max(b.rate for b in denominator),
    }
    cpu = [a.cpu_rate / b.cpu_rate for a, b in zip(numerator, denominator) if a.cpu == a.cpu and b.cpu == b.cpu]
    if cpu:
        out["ratio_cpu"] = statistics.median(cpu)
    return out


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


class Clock:
    """Wall and CPU seconds (see :func:`cpu_seconds`) since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` (floats to 3 significant digits, or 3 decimals when < 10)."""
    def cell(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return "" if value is None else ("yes" if value else "no")
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit(name: str, args: argparse.Namespace, dev: torch.device, result: dict[str, Any], text: str) -> dict[str, Any]:
    """Print the table, write ``<out>/<name>.json`` and print that JSON as the last line of stdout."""
    record = {
        "benchmark": name,
        "mode": "quick" if args.quick else "full",
        "reps": args.reps,
        "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{name}", *sys.argv[1:]]),
        "machine": machine(dev),
        **result,
    }
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(line, flush=True)
    return record
