"""Looking at caches: what one holds and how well it compresses (``info``), whether every stored
byte is intact (``verify``), and which caches a root folder holds (``ls``).

Everything here reads through :class:`kdcache.store.Cache`, so it works the same on local folders
and fsspec URLs.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kdcache.errors import CacheCorrupt, KdcacheError, MissingData
from kdcache.roots import disk_usage, scan_root
from kdcache.store import STATUS_ARRAY, Cache, cache_exists, decode_logits, open_cache

ENERGY_QUANTILES = (0.0, 0.2, 0.5, 0.8, 1.0)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass
class Problem:
    """One thing wrong with a cache: the array, the chunk (storage key) when known, and what."""

    array: str
    chunk: str | None
    what: str

    def __str__(self) -> str:
        return f"{self.array}: {self.what}" + (f" [chunk {self.chunk}]" if self.chunk else "")


class Findings:
    """What a check found (its dataclass has ``problems``); ``ok`` when there are none."""

    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class Verification(Findings):
    """What ``verify`` found; ``ok`` when there are no problems."""

    path: str
    cache_id: str
    arrays: int
    chunks_read: int
    shards_done: int
    num_shards: int
    problems: list[Problem] = field(default_factory=list)


def _shard_list(shards: np.ndarray) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    parts, run = [], [int(shards[0])]
    for s in map(int, shards[1:]):
        if s == run[-1] + 1:
            run.append(s)
            continue
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts)


def _expected_arrays(cache: Cache) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (shape, Zarr dtype, logical dtype) as the manifest describes them."""
    n, k = cache.num_samples, cache.views
    out = {"labels": ((n,), "int64", "int64")}
    for spec in cache.manifest["layout"]["arrays"]:
        out[spec["name"]] = ((n, k, *spec["tail"]), spec["dtype"], spec.get("logical_dtype", spec["dtype"]))
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _locate_unreadable(cache: Cache, name: str, start: int, stop: int) -> tuple[list[Problem], int]:
    """Read ``name[start:stop]`` chunk by chunk and name every chunk that fails to decode."""
    problems, read = [], 0
    views = range(cache.views) if name != "labels" else [0]
    for a in range(start, stop, cache.chunk_samples):
        b = min(a + cache.chunk_samples, stop)
        for v in views:
            read += 1
            try:
                cache.read_samples(name, a, b) if name == "labels" else cache.read_block([name], a, b, v)
            except Exception as exc:  # noqa: BLE001 — any decode failure is damage to report, not to raise
                problems.append(Problem(name, cache.chunk_key(name, a, v), f"unreadable ({_first_line(exc)})"))
    return problems, read


def _value_problems(cache: Cache, name: str, values: np.ndarray, start: int, logical: str) -> list[Problem]:
    """NaN/Inf in float arrays, out-of-range labels; one problem per chunk."""
    if name == "labels":
        bad = (values < 0) | (values >= cache.num_classes)
        what = f"labels outside 0..{cache.num_classes - 1}"
    elif logical in FLOAT_DTYPES:
        if logical == "bfloat16":
            values = (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
        bad = ~np.isfinite(values)
        what = "NaN/Inf values"
    else:
        return []
    if not bad.any():
        return []
    where = np.argwhere(bad)
    views = where[:, 1] if where.shape[1] > 1 else np.zeros(len(where), dtype=np.int64)
    s = cache.chunk_samples
    chunks, counts = np.unique(np.stack([(start + where[:, 0]) // s, views], axis=1), axis=0, return_counts=True)
    return [Problem(name, cache.chunk_key(name, int(a) * s, int(v)), f"{int(c)} {what}")
            for (a, v), c in zip(chunks, counts)]


def verify(path: str) -> Verification:
    """Read every chunk of the cache at ``path``: checksums (crc32c), missing chunk files, shapes and
    dtypes against the manifest, NaN/Inf in float arrays, label range, and the per-shard status."""
    cache = open_cache(path, allow_incomplete=True)
    done = cache.shards_done()
    report = Verification(cache.path, cache.id, 0, 0, int(done.sum()), cache.num_shards)
    if not done.all():
        report.problems.append(Problem(STATUS_ARRAY, None, f"shards {_shard_list(np.flatnonzero(~done))} of "
                                       f"{cache.num_shards} not written — rerun the precompute command to finish"))
    elif not cache.complete:
        report.problems.append(Problem(STATUS_ARRAY, None, "every shard is written but the manifest says "
                                       "'writing' — rerun the precompute command to finish"))
    for name, (shape, dtype, logical) in _expected_arrays(cache).items():
        if not _layout_matches(cache, report, name, shape, dtype):
            continue
        report.problems += [Problem(name, key, "chunk file missing") for key in cache.missing_chunks(name)]
        for shard in range(cache.num_shards):
            if name != "labels" and not done[shard]:
                continue
            start, stop = cache.shard_range(shard)
            try:
                values = cache.read_samples(name, start, stop)
            except Exception:  # noqa: BLE001 — find the damaged chunks one by one
                problems, read = _locate_unreadable(cache, name, start, stop)
                report.problems += problems
                report.chunks_read += read
                continue
            report.chunks_read += -(-(stop - start) // cache.chunk_samples) * (1 if name == "labels" else cache.views)
            report.problems += _value_problems(cache, name, values, start, logical)
    if cache.manifest.get("he"):
        _verify_extra_views(cache, report)
    return report


def _verify_extra_views(cache: Cache, report: Verification) -> None:
    """The ``he/`` arrays of energy-guided extra views (kdcache/heda.py): status, layout, every chunk, values."""
    he = cache.manifest["he"]
    m, k2 = int(he["samples"]), int(he["views"])
    try:
        status = cache.read_array("he/status").astype(bool)
    except Exception:  # noqa: BLE001 — a missing or unreadable status is damage to report
        report.problems.append(Problem("he/status", None, "missing or unreadable — rerun the precompute command"))
        return
    if not status.all():
        report.problems.append(Problem("he/status", None, f"{int((~status).sum())} of {len(status)} extra-view shards "
                                       "not written — rerun the precompute command to finish"))
    expected = {"he/indices": ((m,), "int64", "int64")} | {
        a["name"]: ((m, k2, *a["tail"]), a["dtype"], a.get("logical_dtype", a["dtype"])) for a in he["arrays"]}
    for name, (shape, dtype, logical) in expected.items():
        if not _layout_matches(cache, report, name, shape, dtype):
            continue
        report.problems += [Problem(name, key, "chunk file missing") for key in _missing_he_chunks(cache, name)]
        try:
            values = cache.read_samples(name, 0, m)
        except Exception as exc:  # noqa: BLE001 — any decode failure is damage to report, not to raise
            report.problems.append(Problem(name, None, f"unreadable ({_first_line(exc)})"))
            continue
        report.chunks_read += -(-m // int(he["chunk_samples"])) * (1 if name == "he/indices" else k2)
        if logical in FLOAT_DTYPES and not np.isfinite(decode_logits(values, logical)).all():
            report.problems.append(Problem(name, None, "NaN/Inf values"))


def _layout_matches(cache: Cache, report: Verification, name: str, shape: tuple[int, ...], dtype: str) -> bool:
    """Count ``name`` as checked; report it when missing or stored with another shape or dtype."""
    report.arrays += 1
    try:
        stored = cache.stored_layout(name)
    except CacheCorrupt:
        report.problems.append(Problem(name, None, "array missing"))
        return False
    if stored != (shape, dtype):
        report.problems.append(Problem(name, None, f"stored as {list(stored[0])} {stored[1]}, the manifest "
                                       f"says {list(shape)} {dtype}"))
        return False
    return True


def _missing_he_chunks(cache: Cache, name: str) -> list[str]:
    from zarr.core.sync import sync

    arr = cache.group[name]

    async def listing() -> set[str]:
        return {key async for key in cache.group.store.list_prefix(f"{name}/c/")}

    present = sync(listing())
    keys = [f"{name}/c/" + "/".join(map(str, c))
            for c in itertools.product(*(range(-(-n // s)) for n, s in zip(arr.shape, arr.chunks)))]
    return [key for key in keys if key not in present]


def describe(path: str, scan: bool = True) -> dict[str, Any]:
    """What ``kdcache info`` shows: manifest, per-array stored/raw bytes and, with ``scan``, the
    teacher's top-1 on the cached views and energy quantiles (which read every written view)."""
    cache = open_cache(path, allow_incomplete=True)
    done = cache.shards_done()
    views_total = cache.num_samples * cache.views
    arrays = {}
    for name, (shape, dtype, logical) in _expected_arrays(cache).items():
        stored, raw = cache.array_bytes(name)
        arrays[name] = {"shape": list(shape), "dtype": logical, "stored_bytes": stored, "raw_bytes": raw,
                        "ratio": raw / stored if stored else None, "bytes_per_view": stored / views_total}
    out: dict[str, Any] = {
        "path": cache.path,
        "cache_id": cache.id,
        "shards_done": int(done.sum()),
        "num_shards": cache.num_shards,
        "arrays": arrays,
        "bytes_per_view": sum(a["stored_bytes"] for n, a in arrays.items() if n != "labels") / views_total,
        "manifest": cache.manifest,
    }
    if cache.manifest.get("he"):
        he = cache.manifest["he"]
        names = ["he/indices", *(a["name"] for a in he["arrays"])]
        out["extra_views"] = {"samples": he["samples"], "views": he["views"], "threshold_energy": he["threshold_energy"],
                              "stored_bytes": sum(cache.array_bytes(name)[0] for name in names)}
    if scan:
        out.update(_scan(cache, done))
    return out


def _scan(cache: Cache, done: np.ndarray) -> dict[str, Any]:
    labels = cache.labels()
    correct = seen = 0
    energies = []
    for shard in np.flatnonzero(done):
        start, stop = cache.shard_range(int(shard))
        for view in range(cache.views):
            block = cache.read_block(cache.target_arrays(), start, stop, view)
            correct += int((cache.teacher_probs(block).argmax(axis=-1) == labels[start:stop]).sum())
            seen += stop - start
        energies.append(cache.read_samples("energy", start, stop).reshape(-1, len(_temperatures(cache))))
    quantiles = {}
    if energies:
        values = np.concatenate(energies)
        quantiles = {str(t): np.quantile(values[:, col], ENERGY_QUANTILES).round(4).tolist()
                     for col, t in enumerate(_temperatures(cache))}
    return {"teacher_top1": 100.0 * correct / seen if seen else None, "views_scanned": seen,
            "energy_quantiles": quantiles}


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
