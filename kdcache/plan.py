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
import zarr
import zarr.storage
from zarr.core.sync import sync

from kdcache.augment import Recipe
from kdcache.errors import KdcacheError
from kdcache.precompute import (
    FeatureTap, PrecomputeConfig, class_uniforms, energy, pick_device, prepare, teacher_targets,
)
from kdcache.roots import join
from kdcache.store import ArraySpec, cache_id, compressors, default_chunk_samples, open_cache
from kdcache.teachers import member_outputs
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


def _stored_bytes(values: np.ndarray, spec: ArraySpec, chunk: int) -> int:
    """Bytes of ``values [n, 1, *tail]`` encoded in chunks ``[chunk, 1, *tail]`` with the array's codecs."""
    store = zarr.storage.MemoryStore()
    arr = zarr.create_array(store, shape=values.shape, chunks=(chunk, *values.shape[1:]), dtype=spec.dtype,
                            compressors=compressors(spec.dtype, spec.codec, spec.level), fill_value=0,
                            config={"write_empty_chunks": True})
    arr[:] = values
    return int(sync(store.getsize_prefix("c/")))


def plan(cfg: PrecomputeConfig, teacher: torch.nn.Module | list[torch.nn.Module] | None = None,
         warmup: int | None = None) -> Plan:
    """Estimate the run ``cfg`` describes from ``warmup`` views (default: two batches, at most 1024)."""
    source, recipe, size, teacher, modes, manifest, specs = prepare(cfg, teacher)
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
    outputs, seconds = _warmup(cfg, source, recipe, size, teacher, modes, manifest, indices, views)
    timed = count - min(cfg.batch_size, count) if count > cfg.batch_size else count
    result.warmup_views = count
    result.views_per_second = timed / seconds if seconds > 0 else 0.0
    result.seconds = n * k / result.views_per_second if result.views_per_second else 0.0

    labels = ArraySpec("labels", (), "int64")
    label_bytes = _stored_bytes(np.asarray(source.train.labels, dtype=np.int64)[:, None], labels, chunk)
    result.arrays["labels"] = {"shape": [n], "dtype": "int64", "raw_bytes": n * 8, "estimated_bytes": label_bytes}
    for spec in specs:
        values = outputs[spec.name][:, None]
        per_view = _stored_bytes(values, spec, min(chunk, count)) / count
        raw = n * k * int(np.prod(spec.tail, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        result.arrays[spec.name] = {"shape": [n, k, *spec.tail], "dtype": spec.logical or spec.dtype,
                                    "raw_bytes": raw, "estimated_bytes": round(per_view * n * k)}
    result.total_bytes = sum(a["estimated_bytes"] for a in result.arrays.values())
    return result


def _warmup(cfg: PrecomputeConfig, source, recipe: Recipe, size: int, teacher: torch.nn.Module,
            modes: dict[str, str], manifest: dict[str, Any], indices: np.ndarray,
            views: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """What precompute would store for views (indices[j], views[j]), and the seconds the batches after
    the first took (render + teacher; the first batch warms caches and kernels up)."""
    device = pick_device(cfg.device)
    teacher = teacher.to(device).eval()
    renderer = Renderer(source.train, recipe, size, source.mean, source.std)
    entry = manifest["outputs"]["logits"]
    draws = entry["draws"] if entry["mode"] == "sampled" else 0
    parts: list[dict[str, np.ndarray]] = []
    seconds = 0.0
    tap = FeatureTap(teacher, modes)
    try:
        with torch.inference_mode():
            for b, lo in enumerate(range(0, len(indices), cfg.batch_size)):
                began = time.perf_counter()
                idx, vs = indices[lo : lo + cfg.batch_size], views[lo : lo + cfg.batch_size]
                params = recipe.sample(cfg.seed, idx, vs, len(source.train))
                inputs = renderer.batch(idx, params).to(device)
                logits = teacher(inputs).float()
                uniforms = torch.as_tensor(class_uniforms(cfg.seed, idx, vs, draws)).to(device) if draws else None
                parts.append({
                    **teacher_targets(logits, entry, uniforms),
                    "energy": energy(logits, cfg.energy_t).cpu().numpy(),
                    **{f"features/{layer}": fmap.cpu().numpy() for layer, fmap in tap.take().items()},
                    **{f"aug/{name}": values for name, values in params.items()},
                    **member_outputs(teacher, manifest["outputs"]),
                })
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if b > 0 or len(indices) <= cfg.batch_size:
                    seconds += time.perf_counter() - began
    finally:
        tap.close()
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}, seconds
