"""Integrity (``kdcache verify``): read every chunk of a cache and name each damaged array and chunk.

Checks crc32c checksums, missing chunk files, shapes and dtypes against the manifest, NaN/Inf in float
arrays, the label range and the per-shard status, for the regular and the extra views. Everything reads
through :class:`kdcache.cache.store.Cache`, so it works the same on local folders and fsspec URLs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kdcache.cache.chunks import ChunkIndex
from kdcache.cache.digests import INPUTS, chunk_digests, digest_name
from kdcache.cache.lock import STALE_SECONDS, WriterLock, read_lock
from kdcache.cache.logits import decode_logits
from kdcache.cache.store import STATUS_ARRAY, Cache, CacheWriter, open_cache, open_writer
from kdcache.errors import CacheCorrupt

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
        values = decode_logits(values, logical) if logical == "bfloat16" else values
        bad = ~np.isfinite(values)
        if name.endswith("topk/values"):  # log-probabilities: -inf is a class of probability 0 (an import's)
            bad &= ~np.isneginf(values)
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


def verify(path: str, params: bool = False) -> Verification:
    """Read every chunk of the cache at ``path``: checksums (crc32c), missing chunk files, shapes and
    dtypes against the manifest, NaN/Inf in float arrays, label range, and the per-shard status; with
    ``params``, also that every stored augmentation param lies in its op's domain (this loads the ops: torch)."""
    cache = open_cache(path, allow_incomplete=True)
    every_chunk = cache.check_chunks  # caches written before 0.2 may lack chunks equal to the fill value
    cache.check_chunks = False  # missing chunk objects are reported below, once each, not raised
    try:
        done = cache.shards_done(strict=False)
    except CacheCorrupt:
        report = Verification(cache.path, cache.id, 0, 0, 0, cache.num_shards)
        report.problems.append(Problem(STATUS_ARRAY, None, "array missing — rebuild with precompute --rebuild"))
        return report
    report = Verification(cache.path, cache.id, 0, 0, int(done.sum()), cache.num_shards)
    report.problems += _flag_problems(cache, done)  # damaged flags, named one by one
    if not report.problems:
        report.problems += _status_problems(cache, done)
    for name, (shape, dtype, logical) in cache.expected_arrays().items():
        if not _layout_matches(cache, report, name, shape, dtype):
            continue
        missing = cache.missing_chunks(name, done=done) if every_chunk else []
        report.problems += [Problem(name, key, "chunk file missing") for key in missing]
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
            if name != "labels":
                report.problems += [p for p in _digest_problems(cache, name, values, start) if p.chunk not in missing]
    if cache.manifest.get("he"):
        _verify_extra_views(cache, report)
    report.problems += _inputs_problems(cache)
    if params and not any(p.array.startswith("aug/") for p in report.problems):
        report.problems += _param_problems(cache, done)
    return report


def _param_problems(cache: Cache, done: np.ndarray) -> list[Problem]:
    """Stored params of the regular views that no op of the recipe writes (Recipe.stored_problem: out of an
    op's domain, partners outside the dataset, chains naming two partners): one problem per shard and view."""
    from kdcache.augment import Recipe
    from kdcache.errors import KdcacheError

    try:
        recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    except KdcacheError:
        return []  # an unreadable recipe is reported where the cache is used
    fields = list(recipe.fields())
    problems = []
    for shard in np.flatnonzero(done).tolist():
        start, stop = cache.shard_range(shard)
        try:
            block = {name: cache.read_samples(f"aug/{name}", start, stop) for name in fields}
        except Exception:  # noqa: BLE001 - an unreadable chunk is reported by the checks above
            continue
        for v in range(cache.views):
            why = recipe.stored_problem({name: values[:, v] for name, values in block.items()}, cache.num_samples)
            if why is not None:
                problems.append(Problem("aug", None, f"samples {start}..{stop - 1}, view {v}: {why} — no op writes "
                                        "that; the cache is damaged or forged"))
    return problems


def _digest_problems(cache: Cache, name: str, values: np.ndarray, start: int) -> list[Problem]:
    """Chunks of ``values`` (rows from ``start`` of per-view array ``name``) whose values are not the ones
    written at their place: a chunk moved from another position, view or array (kdcache/cache/digests.py)."""
    try:
        table = cache.digests(name)
    except CacheCorrupt as exc:
        return [Problem(digest_name(name), None, f"missing or unreadable ({_first_line(exc)})")]
    if table is None:
        return []
    chunk = cache.group[name].chunks[0]
    found = chunk_digests(values, chunk)
    first = start // chunk
    stored = table[first : first + len(found), : found.shape[1]]
    return [Problem(name, cache.chunk_key(name, (first + int(r)) * chunk, int(v)),
                    "holds values that are not the ones written there (moved from another position, view or array, "
                    "or changed)")
            for r, v in np.argwhere(found != stored)]


def _inputs_problems(cache: Cache) -> list[Problem]:
    """The crc32c table of the teacher's inputs, where the cache keeps one: there and whole."""
    try:
        cache.input_checksums()
    except CacheCorrupt as exc:
        return [Problem(INPUTS, None, f"missing or unreadable ({_first_line(exc)})")]
    return []


def _status_problems(cache: Cache, done: np.ndarray) -> list[Problem]:
    """Unwritten shards (a live writer's, or an interrupted run's) and a finished cache left 'writing'."""
    todo = _shard_list(np.flatnonzero(~done)) if not done.all() else ""
    writer = read_lock(cache.path)
    if todo and writer is not None and writer.age() < STALE_SECONDS:
        return [Problem(STATUS_ARRAY, None, f"shards {todo} of {cache.num_shards} not written yet: "
                        f"{writer.describe()} is writing them — wait for it to finish")]
    if todo:
        return [Problem(STATUS_ARRAY, None, f"shards {todo} of {cache.num_shards} not written — rerun the "
                        "precompute command to finish")]
    if not cache.complete:
        return [Problem(STATUS_ARRAY, None, "every shard is written but the manifest says 'writing' — rerun the "
                        "precompute command to finish")]
    return []


def _flag_problems(cache: Cache, done: np.ndarray) -> list[Problem]:
    """Shard flags whose chunk does not decode (read as not done), or is gone from a complete cache."""
    problems = []
    for shard in np.flatnonzero(~done):
        try:
            cache.read_flag(int(shard))
        except CacheCorrupt as exc:
            problems.append(Problem(STATUS_ARRAY, f"{STATUS_ARRAY}/c/{shard}", "unreadable — "
                                    f"{str(exc).partition('(')[2].partition(')')[0]}; verify --repair rewrites shard"))
            continue
        if cache.complete:
            problems.append(Problem(STATUS_ARRAY, f"{STATUS_ARRAY}/c/{shard}", "flag cleared in a complete cache — "
                                    "verify --repair, then rerun the precompute command"))
    return problems


def _verify_extra_views(cache: Cache, report: Verification) -> None:
    """The ``he/`` arrays of energy-guided extra views (kdcache/cache/view_sets.py): status, layout, every chunk, values."""
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
    for name, (shape, dtype, logical) in cache.expected_extra_arrays().items():
        if not _layout_matches(cache, report, name, shape, dtype):
            continue
        if cache.manifest["layout"].get("every_chunk"):
            report.problems += [Problem(name, key, "chunk file missing")
                                for key in cache.missing_chunks(name, every=True)]
        try:
            values = cache.read_samples(name, 0, m)
        except Exception as exc:  # noqa: BLE001 — any decode failure is damage to report, not to raise
            report.problems.append(Problem(name, None, f"unreadable ({_first_line(exc)})"))
            continue
        report.chunks_read += -(-m // int(he["chunk_samples"])) * (1 if name == "he/indices" else k2)
        if logical in FLOAT_DTYPES and not np.isfinite(decode_logits(values, logical)).all():
            report.problems.append(Problem(name, None, "NaN/Inf values"))
        if name != "he/indices":
            report.problems += _digest_problems(cache, name, values, 0)


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


def damaged_shards(cache: Cache) -> list[int]:
    """Shards a complete cache must rewrite: flags not set, or a chunk object missing from one of its
    per-view arrays (one fresh listing per array). Damage that rewriting shards cannot mend (the labels,
    an array's metadata) raises CacheCorrupt."""
    cache.labels()
    bad = set(np.flatnonzero(~cache.shards_done(strict=False)).tolist())
    for name in cache.array_names:
        index = ChunkIndex(cache.group[name], name) if name in cache.group else None
        if index is None:
            raise CacheCorrupt(f"cache {cache.path} lacks array {name} (its zarr.json is missing) — rebuild it with "
                               "precompute --rebuild")
        rows = np.flatnonzero(~index.present.reshape(index.shape[0], -1).all(axis=1))
        bad |= {int(r) * index.outer[0] // cache.shard_samples for r in rows}
    return sorted(bad)


def reopen_shards(cache: CacheWriter, shards: list[int]) -> None:
    """Clear the done flags of ``shards`` and mark the cache as being written, so that the same precompute
    command rewrites exactly those shards (``verify --repair``, and precompute before it reuses a cache)."""
    if not shards:
        return
    for shard in shards:
        cache.mark_done(STATUS_ARRAY, shard, done=False)
    manifest = dict(cache.manifest, status="writing")
    manifest.pop("completed", None)
    cache.save_manifest(manifest)


def shard_of(cache: Cache, key: str) -> int | None:
    """The shard holding chunk object ``key`` (``name/c/i/…``); None for labels and extra-view arrays."""
    name, sep, rest = key.partition("/c/")
    if not sep or name not in cache.array_names:
        return None
    arr = cache.group[name]
    first = int(rest.split("/")[0].split(" ")[0])
    return first * (arr.shards or arr.chunks)[0] // cache.shard_samples


def repair(path: str) -> tuple[Verification, list[int]]:
    """``verify --repair``: verify, then reopen every shard holding a missing, unreadable or non-finite
    chunk, so the precompute command rewrites them. Damage outside shards (labels, metadata) is left to
    ``precompute --rebuild``. Returns the verification and the reopened shards."""
    report = verify(path)
    cache = open_writer(path, allow_incomplete=True)
    shards = sorted({s for p in report.problems if p.chunk for s in [shard_of(cache, p.chunk)] if s is not None}
                    | set(np.flatnonzero(~cache.shards_done(strict=False)).tolist()))
    lock = WriterLock(cache.path).acquire()  # refuses while a writer holds the cache
    try:
        reopen_shards(cache, shards)
    finally:
        lock.release()
    return report, shards
