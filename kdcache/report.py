"""``kdcache report``: plots and markdown tables of training runs, and a cache's energy histogram.

A run is a directory written by ``kdcache train`` (run.json and metrics.jsonl). Plots need
matplotlib, an optional extra (``pip install 'kdcache[plots]'``); the tables do not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.cache.store import Cache
from kdcache.errors import CacheMismatch, InvalidSpec, MissingData
from kdcache.extras import require

# Settings that do not change what a run computes, or that differ on purpose between repeats.
_NOT_A_SETTING = {"out", "seed", "resume", "progress", "workers", "device", "online_teacher_sha256", "train_samples"}


@dataclass
class Run:
    """One training run directory: its settings (run.json) and per-epoch metrics (metrics.jsonl)."""

    path: Path
    name: str
    settings: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1]

    @property
    def label(self) -> str:
        """What the run trained with, e.g. ``kd T=2 (cache)``, ``ce``, ``kd (online)``."""
        s = self.settings
        params = " ".join(f"{k}={v}" for k, v in sorted(s.get("loss_params", {}).items()))
        teacher = " (online)" if s.get("online_teacher") else " (cache)" if s.get("cache") else ""
        robust = "".join(f" {flag} {s[key]}" for key, flag, off in
                         (("label_noise", "noise", 0), ("imbalance", "imbalance", 1)) if s.get(key, off) != off)
        return " ".join(part for part in (s.get("loss", "?"), params) if part) + teacher + robust

    def group_key(self) -> str:
        """Runs with the same key are repeats of one setting with other seeds."""
        return json.dumps({k: v for k, v in self.settings.items() if k not in _NOT_A_SETTING}, sort_keys=True)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read run directories; each must hold run.json and at least one epoch in metrics.jsonl."""
    if not paths:
        raise InvalidSpec("kdcache report needs at least one RUN_DIR — e.g. kdcache report runs/kd runs/ce --out report")
    runs = []
    for raw in paths:
        path = Path(raw)
        settings_file, metrics_file = path / "run.json", path / "metrics.jsonl"
        if not settings_file.is_file() or not metrics_file.is_file():
            raise MissingData(f"{path} is not a finished training run (no run.json or metrics.jsonl) "
                              "— pass directories given to kdcache train --out")
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if not metrics:
            raise MissingData(f"{path}/metrics.jsonl holds no epoch yet — let the run finish an epoch")
        runs.append(Run(path, path.name, json.loads(settings_file.read_text()), metrics))
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:  # same directory name under different parents
            run.name = f"{run.path.parent.name}/{run.path.name}"
    return runs


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def runs_table(runs: Sequence[Run]) -> str:
    """Markdown: one row per run with its final test top-1/top-5/ECE, images/s and training loss."""
    lines = ["| run | model | setting | epochs | test top-1 (%) | test top-5 (%) | test ECE | images/s | train loss |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        f = run.final
        lines.append(f"| {run.name} | {run.settings.get('model', '?')} | {run.label} | {f['epoch']} | "
                     f"{f['test_top1']:.2f} | {f['test_top5']:.2f} | {f['test_ece']:.4f} | "
                     f"{f['images_per_s']:.0f} | {f['loss']:.4f} |")
    return "\n".join(lines)


def summary_table(runs: Sequence[Run]) -> str:
    """Markdown: runs that differ only in seed are one row, mean ± sample std over the seeds."""
    lines = ["| setting | model | seeds | test top-1 (%) | test top-5 (%) | test ECE | images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for members in _groups(runs):
        top1, top5, ece, speed = (_mean_std([float(r.final[key]) for r in members], digits) for key, digits in
                                  (("test_top1", 2), ("test_top5", 2), ("test_ece", 4), ("images_per_s", 0)))
        lines.append(f"| {members[0].label} | {members[0].settings.get('model', '?')} | {len(members)} | "
                     f"{top1} | {top5} | {ece} | {speed} |")
    return "\n".join(lines)


def _figure(width: float, height: float, panels: int):
    plots = require("matplotlib.figure", "plots", "kdcache report's plots")
    figure = plots.Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped by setting (repeats with other seeds together), in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group_key(), []).append(run)
    return list(groups.values())


def plot_curves(runs: Sequence[Run], path: Path) -> Path:
    """PNG with top-1 and loss against epoch for every run: training dashed, test solid; one colour per
    setting, so the seeds of one setting share a colour and a legend entry."""
    figure, (acc, loss) = _figure(13, 5, 2)
    from matplotlib import colormaps  # importable: _figure checked matplotlib

    groups = _groups(runs)
    palette = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    for index, members in enumerate(groups):
        color = palette(index % palette.N)
        name = members[0].name if len(members) == 1 else f"{members[0].label} ({len(members)} seeds)"
        for k, run in enumerate(members):
            epochs = [m["epoch"] for m in run.metrics]
            acc.plot(epochs, [m["test_top1"] for m in run.metrics], color=color, marker="o", ms=3,
                     label=name if k == 0 else None)
            acc.plot(epochs, [m["train_top1"] for m in run.metrics], color=color, ls="--", alpha=0.7)
            loss.plot(epochs, [m.get("test_loss", math.nan) for m in run.metrics], color=color, marker="o", ms=3)
            loss.plot(epochs, [m["loss"] for m in run.metrics], color=color, ls="--", alpha=0.7)
    acc.set(title="top-1 (solid: test, dashed: train)", xlabel="epoch", ylabel="top-1 (%)")
    loss.set(title="loss (solid: test CE, dashed: train objective)", xlabel="epoch", ylabel="loss (log scale)",
             yscale="log")  # objectives of different losses differ by orders of magnitude
    for axes in (acc, loss):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.legend(loc="outside right upper", fontsize="small")
    figure.savefig(path, dpi=110)
    return path


def plot_energy(cache: Cache, path: Path, quantiles: tuple[float, float] = (0.2, 0.8)) -> Path:
    """PNG histogram of the teacher energies of every cached view, one panel per stored temperature,
    with the ``quantiles`` energy KD uses as thresholds (defaults r_low = r_high = 0.2) marked."""
    if "energy" not in cache.array_names:
        raise CacheMismatch(f"cache {cache.path} stores no teacher energies — re-run precompute with energies enabled")
    temperatures = [float(t) for t in cache.manifest["outputs"]["energy"]["temperatures"]]
    figure, panels = _figure(5.5 * len(temperatures), 4, len(temperatures))
    for axes, t in zip(panels, temperatures):
        energies = cache.all_energy(t).reshape(-1)
        axes.hist(energies, bins=60, color="C0", alpha=0.85)
        for k, value in enumerate(np.quantile(energies, quantiles)):
            label = f"quantiles {quantiles[0]:g}, {quantiles[1]:g} (energy_kd thresholds)" if k == 0 else None
            axes.axvline(value, color="C3", ls="--", lw=1, label=label)
        axes.legend(loc="upper left", fontsize="small")
        axes.set(title=f"teacher energy at T={t:g} ({len(energies):,} views)", xlabel="E = -T·logsumexp(z/T)",
                 ylabel="views")
        axes.grid(alpha=0.3)
    figure.suptitle(f"cache {cache.id}: {cache.manifest['dataset']['spec']}, {cache.views} views per sample")
    figure.savefig(path, dpi=110)
    return path


def write_report(run_dirs: Sequence[str | Path], out: str | Path, cache: Cache | None = None) -> list[Path]:
    """Write runs.md (tables), curves.png and, with a cache, energy.png into ``out``; return their paths."""
    runs = load_runs(run_dirs)
    _figure(1, 1, 1)  # matplotlib is there before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = out / "runs.md"
    tables.write_text("# Runs\n\n" + runs_table(runs) + "\n\n## Mean ± std over seeds\n\n" + summary_table(runs)
                      + "\n")
    written = [tables, plot_curves(runs, out / "curves.png")]
    if cache is not None:
        written.append(plot_energy(cache, out / "energy.png"))
    return written
