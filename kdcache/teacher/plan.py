"""Plan a precompute before paying for it (``kdcache precompute … --dry-run``).

A short warm-up runs the real teacher on a few real views (spread over the dataset and the view
axis) and encodes what precompute would store with the real codecs and chunk shape in memory; the
stored bytes per view of that sample, times N·K, estimate each array's size, and the warm-up's
views per second estimate the time. Nothing is written anywhere.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.cache.arrays import ArraySpec, default_chunk_samples, encoded_bytes
from kdcache.cache.manifest import cache_id
from kdcache.cache.roots import join
from kdcache.cache.store import open_cache
from kdcache.errors import KdcacheError
from kdcache.runtime import loader_workers, pick_device
from kdcache.teacher.config import PrecomputeConfig, PrecomputeSettings, resolve
from kdcache.teacher.passes import ViewBatch, run_teacher
from kdcache.teacher.precompute import prepare
from kdcache.views import Renderer

MAX_WARMUP = 1024  # views


@dataclass
class Plan:
    """What a precompute run would do: teacher passes, bytes per array and in total, time."""

    cache_id: str
    path: str
    reuses: bool  # a complete cache with this id exists: the run would compute nothing
    samples: int
    views: int
    members: int
    forward_passes: int  # model forward passes on one view: samples × views × members (0 when reused)
    chunk_samples: int
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shape, dtype, raw/estimated bytes
    total_bytes: int = 0
    warmup_views: int = 0
    views_per_second: float = 0.0
    seconds: float = 0.0  # estimated teacher time for every view

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan(cfg: PrecomputeConfig | PrecomputeSettings, teacher: torch.nn.Module | list[torch.nn.Module] | None = None,
         warmup: int | None = None) -> Plan:
    """Estimate the run ``cfg`` describes from ``warmup`` views (default: two batches, at most 1024)."""
    settings = resolve(cfg)
    cfg = settings.config
    device = pick_device(cfg.device)
    source, recipe, pre, teacher, manifest, specs = prepare(settings, teacher, device)
    n, k = len(source.train), cfg.views
    wanted = cache_id(manifest)
    path = join(cfg.out, wanted)
    try:
        reuses = open_cache(path).complete
    except KdcacheError:
        reuses = False
    members = len(manifest["teacher"]["members"])
    chunk = min(cfg.chunk_samples or default_chunk_samples(specs), n)
    result = Plan(wanted, path, reuses, n, k, members, 0 if reuses else n * k * members, chunk)

    count = min(n * k, warmup or min(2 * cfg.batch_size, MAX_WARMUP))
    pairs = np.linspace(0, n * k - 1, count).round().astype(np.int64)
    indices, views = pairs // k, pairs % k
    renderer = Renderer.for_model(source.train, recipe, pre, cfg.decode)
    outputs, seconds = _warmup(cfg, source, renderer, teacher, manifest, indices, views, device)
    timed = count - min(cfg.batch_size, count) if count > cfg.batch_size else count
    result.warmup_views = count
    result.views_per_second = timed / seconds if seconds > 0 else 0.0
    result.seconds = n * k / result.views_per_second if result.views_per_second else 0.0

    labels = ArraySpec("labels", (), "int64")
    label_bytes = encoded_bytes(np.asarray(source.train.labels, dtype=np.int64)[:, None], labels, chunk)
    result.arrays["labels"] = {"shape": [n], "dtype": "int64", "raw_bytes": n * 8, "estimated_bytes": label_bytes}
    for spec in specs:
        values = outputs[spec.name][:, None]
        per_view = encoded_bytes(values, spec, min(chunk, count)) / count
        raw = n * k * int(np.prod(spec.tail, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        result.arrays[spec.name] = {"shape": [n, k, *spec.tail], "dtype": spec.logical or spec.dtype,
                                    "raw_bytes": raw, "estimated_bytes": round(per_view * n * k)}
    result.total_bytes = sum(a["estimated_bytes"] for a in result.arrays.values())
    return result


def _warmup(cfg: PrecomputeConfig, source, renderer: Renderer, teacher: torch.nn.Module, manifest: dict[str, Any],
            indices: np.ndarray, views: np.ndarray, device: torch.device) -> tuple[dict[str, np.ndarray], float]:
    """What precompute would store for views (indices[j], views[j]), and the seconds the batches after
    the first took (the teacher pass, pipelined as precompute runs it; the first batch warms caches and
    kernels up)."""
    batches = [ViewBatch(indices[lo : lo + cfg.batch_size], views[lo : lo + cfg.batch_size])
               for lo in range(0, len(indices), cfg.batch_size)]
    parts: list[dict[str, np.ndarray]] = []
    began = time.perf_counter()
    for out in run_teacher(teacher.to(device).eval(), renderer, batches, manifest["outputs"], seed=cfg.seed,
                           num_samples=len(source.train), device=device, workers=loader_workers(cfg.workers, device)):
        parts.append(out.arrays)
        if len(parts) == 1 and len(batches) > 1:
            began = time.perf_counter()
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}, time.perf_counter() - began
