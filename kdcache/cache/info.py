"""What caches hold (``kdcache info``, ``kdcache ls``): manifest, per-array stored and raw bytes, the
teacher's top-1 on the cached views, energy quantiles, and the caches a root folder holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdcache.cache.roots import disk_usage, scan_root
from kdcache.cache.store import Cache, cache_exists, open_cache
from kdcache.errors import InvalidSpec, KdcacheError, MissingData

ENERGY_QUANTILES = (0.0, 0.2, 0.5, 0.8, 1.0)
ENERGY_SAMPLE = 1 << 20  # views whose energies info's quantiles use at most (an even stride beyond)

def describe(path: str, scan: bool = True) -> dict[str, Any]:
    """What ``kdcache info`` shows: manifest, per-array stored/raw bytes and, with ``scan``, the
    teacher's top-1 on the cached views and energy quantiles (which read every written view)."""
    cache = open_cache(path, allow_incomplete=True)
    done = cache.shards_done()
    views_total = cache.num_samples * cache.views
    arrays = {}
    for name, (shape, dtype, logical) in cache.expected_arrays().items():
        stored, raw = cache.array_bytes(name)
        arrays[name] = {"shape": list(shape), "dtype": logical, "stored_bytes": stored, "raw_bytes": raw,
                        "ratio": raw / stored if stored else None, "bytes_per_view": stored / views_total}
    out: dict[str, Any] = {
        "path": cache.path,
        "cache_id": cache.id,
        "stored_format": cache.stored_format,
        "shards_done": int(done.sum()),
        "num_shards": cache.num_shards,
        "arrays": arrays,
        "bytes_per_view": sum(a["stored_bytes"] for n, a in arrays.items() if n != "labels") / views_total,
        "bound": {"chunks": cache.binds_chunks, "inputs": cache.binds_inputs},
        "manifest": cache.manifest,
    }
    if cache.manifest.get("he"):
        he = cache.manifest["he"]
        names = list(cache.expected_extra_arrays())
        out["extra_views"] = {"samples": he["samples"], "views": he["views"], "threshold_energy": he["threshold_energy"],
                              "stored_bytes": sum(cache.array_bytes(name)[0] for name in names)}
    if scan:
        out.update(_scan(cache, done))
    return out


def _scan(cache: Cache, done: np.ndarray) -> dict[str, Any]:
    """Teacher top-1 over every written view (streamed shard by shard) and energy quantiles, exact up to
    ``ENERGY_SAMPLE`` views and beyond that of an evenly strided sample of that many, so that memory
    stays bounded however large the cache."""
    labels = cache.labels()
    temps = _temperatures(cache)
    correct = seen = 0
    ranges = [cache.shard_range(int(shard)) for shard in np.flatnonzero(done)]
    stride = max(1, -(-sum(stop - start for start, stop in ranges) * cache.views // ENERGY_SAMPLE))
    energies, skip = [], 0
    low = high = None
    for start, stop in ranges:
        for view in range(cache.views):
            block = cache.read_block(cache.target_arrays(), start, stop, view)
            correct += int((cache.teacher_probs(block).argmax(axis=-1) == labels[start:stop]).sum())
            seen += stop - start
        if not temps:  # an imported cache: its source stored no energies
            continue
        values = cache.read_samples("energy", start, stop).reshape(-1, len(temps))
        energies.append(values[skip::stride].copy())
        skip = (skip - len(values)) % stride
        low = values.min(0) if low is None else np.minimum(low, values.min(0))
        high = values.max(0) if high is None else np.maximum(high, values.max(0))
    quantiles = {}
    if energies:
        values = np.concatenate(energies)
        quantiles = {}
        for col, t in enumerate(temps):
            q = np.quantile(values[:, col], ENERGY_QUANTILES)
            q[0], q[-1] = low[col], high[col]  # the extremes stay exact
            quantiles[str(t)] = q.round(4).tolist()
    return {"teacher_top1": 100.0 * correct / seen if seen else None, "views_scanned": seen,
            "energy_quantiles": quantiles, "energy_quantile_views": int(sum(len(e) for e in energies))}


def _temperatures(cache: Cache) -> list[float]:
    return [float(t) for t in cache.manifest["outputs"]["energy"]["temperatures"]]


def modes(manifest: dict[str, Any]) -> str:
    """The stored outputs in one short string, e.g. ``topk:10/float16 layer3:attention``."""
    logits = manifest["outputs"]["logits"]
    if logits["mode"] == "dense":
        text = f"dense/{logits['dtype']}"
    elif logits["mode"] == "topk":
        text = f"topk:{logits['k']}/{logits['dtype']}"
    else:
        text = f"sampled:{logits['draws']}"
    return " ".join([text, *(f"{f['layer']}:{f['mode']}" for f in manifest["outputs"].get("features", []))])


def list_caches(root: str) -> list[dict[str, Any]]:
    """One row per cache under ``root`` (or for ``root`` itself if it is a cache)."""
    if "://" not in root or root.startswith("file://"):
        local = Path(root.removeprefix("file://")).expanduser()
        if local.is_file():
            raise InvalidSpec(f"{root} is a file, not a folder of caches — pass the folder given to precompute --out")
        if not local.exists():
            raise MissingData(f"no folder {root} — pass the folder given to precompute --out")
    if cache_exists(root):
        folders, aliases = [root], {}
    else:
        folders, aliases = scan_root(root)
    rows = []
    for path in folders:
        try:
            cache = open_cache(path, allow_incomplete=True)
        except MissingData:
            continue  # a folder that is no cache
        except KdcacheError as exc:
            rows.append({"path": path, "id": path.rstrip("/").rpartition("/")[2], "status": f"unreadable: {exc}"})
            continue
        m, done = cache.manifest, int(cache.shards_done().sum())
        prov = m.get("provenance", {})
        rows.append({
            "id": cache.id,
            "path": cache.path,
            "alias": aliases.get(path.rstrip("/").rpartition("/")[2], []),  # aliases name folders (extend: not the id)
            "teacher": "+".join(t["spec"] for t in m["teacher"]["members"]),
            "dataset": m["dataset"]["spec"],
            "views": cache.views,
            "modes": modes(m),
            "size_bytes": disk_usage(cache.path),
            "status": "complete" if cache.complete else f"writing {done}/{cache.num_shards} shards",
            "created_by": f"{prov.get('user', '?')}@{prov.get('host', '?')}",
            "created": prov.get("created"),
        })
    return rows
