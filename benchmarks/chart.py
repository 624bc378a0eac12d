"""The one chart of docs/benchmarks.md: every measured ratio against its target, from results/*.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

STORAGE_TARGET = 32.0  # bytes/view of top-10 over 1000 classes, augmentation params included


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def draw(path: Path, folder: Path | None = None) -> Path:
    """Write a PNG with one panel per benchmark that has results; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = folder or RESULTS
    panels = [(name, data) for name in PANELS if (data := _load(folder, name)) is not None]
    rows = max(1, (len(panels) + 1) // 2)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.8 * rows), squeeze=False)
    for ax, (name, data) in zip(axes.flat, panels):
        PANELS[name](ax, data)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    machine = panels[0][1]["machine"] if panels else {}
    fig.suptitle(f"kdcache benchmarks — {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
                 f"torch {machine.get('torch', '?')}, {machine.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, labels: list[str], values: list[float], targets: list[float | None], ylabel: str, title: str,
          lower_is_better: bool = False) -> None:
    ok = (lambda v, t: v <= t) if lower_is_better else (lambda v, t: v >= t)
    colors = ["tab:gray" if t is None else "tab:green" if ok(v, t) else "tab:red" for v, t in zip(values, targets)]
    ax.barh(range(len(values)), values, color=colors)
    for i, t in enumerate(targets):
        if t is not None:
            ax.plot([t, t], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)


def _precompute_overhead(ax, data: dict[str, Any]) -> None:
    rows = [r for r in data["results"] if "ratio_to_bare" in r and r["variant"] != "bare inference"]
    _bars(ax, [f"{r['teacher'].removeprefix('torchvision:')}: {r['variant']}" for r in rows],
          [r["ratio_to_bare"] for r in rows], [r["target"] for r in rows],
          "precompute ÷ bare teacher, views/s (bars) and views/CPU-s (◆); black: target",
          f"precompute overhead ({data['machine']['torch_threads']} torch threads)")
    cpu = [(i, r["ratio_cpu"]) for i, r in enumerate(rows) if r.get("ratio_cpu") is not None]
    ax.plot([c for _, c in cpu], [i for i, _ in cpu], "D", color="white", markeredgecolor="black", markersize=5)


def _train_throughput(ax, data: dict[str, Any]) -> None:
    labels, values, targets = [], [], []
    for r in data["results"]:
        labels += [f"{r['pair']}: (b)/(a)", f"{r['pair']}: (b)/(c)"]
        values += [r["b/a"], r["b/c"]]
        targets += [r["b/a_target"], r["b/c_target"]]
    _bars(ax, labels, values, targets, "throughput ratio (black: target)",
          "training: cache (b) vs alone (a) and online teacher (c)")


def _cache_read(ax, data: dict[str, Any]) -> None:
    rows = [r for r in data["results"] if r["reader"] in ("block reader + decode", "item reader + collate + decode",
                                                           "image replay (block reader + render)")]
    short = {"block reader + decode": "block", "item reader + collate + decode": "items",
             "image replay (block reader + render)": "+render"}
    _bars(ax, [f"{r['cache']} C={r['classes']} {short[r['reader']]}" for r in rows],
          [r["views_per_cpu_s"] for r in rows],
          [data["target"] if r["reader"] == "block reader + decode" else None for r in rows],
          "views per CPU-second (log; black: target)", "training reader")
    ax.set_xscale("log")


def _storage(ax, data: dict[str, Any]) -> None:
    """Bytes/view of every logit mode with the default codec, and top-10 over 1000 classes + aug params."""
    codec = "blosc-zstd:5"
    rows = [r for r in data["rows"] if r.get("classes") and codec in r]
    aug = next((r[codec] for r in data["rows"] if r["output"].startswith("aug")), 0.0)
    labels = [f"{r['output']} C={r['classes']}" for r in rows]
    values = [r[codec] for r in rows]
    targets: list[float | None] = [None] * len(rows)
    top10 = next((r[codec] for r in rows if r["output"].startswith("topk:10") and r["classes"] == 1000), None)
    if top10 is not None:
        labels.append("topk:10 C=1000 + aug params")
        values.append(top10 + aug)
        targets.append(STORAGE_TARGET)
    _bars(ax, labels, values, targets, f"bytes per view, {codec} (log; black: target)", "storage",
          lower_is_better=True)
    ax.set_xscale("log")

PANELS = {"precompute_overhead": _precompute_overhead, "train_throughput": _train_throughput,
          "cache_read": _cache_read, "storage": _storage}
