"""Growing a cache without recomputing it (``kdcache extend``).

- ``views=K2`` adds views K..K2-1. Their params, class draws and teacher outputs are pure functions
  of (seed, i, v), so they are exactly what a fresh K2-view cache holds; the teacher runs only on them.
- ``features=("LAYER:MODE", …)`` adds feature arrays; the teacher runs on every view, and only the
  new arrays (and, for new views, every array) are written.

The cache keeps its folder (moving it would break its readers, and costs a full copy on object
stores), and only new chunks are written: a chunk holds one view, so readers of the existing views
keep working throughout. The manifest is replaced last — views, features, layout, the id a one-shot
build with the final settings has, and a ``history`` entry — and alias files ``ROOT/<new id>`` and
``ROOT/<new readable alias>`` name the folder, so ``precompute`` with the final settings finds it.
See docs/format.md, "Growing a cache".
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kdcache import data
from kdcache.augment import Recipe
from kdcache.cache.arrays import ArraySpec, layout_entry
from kdcache.cache.formats import FORMAT_VERSION
from kdcache.cache.claim import ClaimOptions
from kdcache.cache.claim import lock as claim_lock
from kdcache.cache.lock import WriterLock
from kdcache.cache.logits import decode_logits, storage_dtype
from kdcache.cache.manifest import record_change, refuse_imported
from kdcache.cache.roots import publish_aliases
from kdcache.cache.store import CacheWriter, open_writer
from kdcache.errors import CacheCorrupt, InvalidSpec
from kdcache.models.preprocess import Preprocess
from kdcache.runtime import loader_workers, pick_device
from kdcache.teacher.config import ExtendConfig
from kdcache.teacher.ensemble import combine, load_recorded, load_teachers, member_pairs
from kdcache.teacher.config import parse_features
from kdcache.teacher.outputs import feature_entries, feature_specs
from kdcache.teacher.passes import Shard, ViewBatch, cache_shards, run_shards
from kdcache.views import Renderer, recorded_decode

OnBatch = Callable[[torch.Tensor, torch.Tensor], None]

@dataclass
class ExtendResult:
    path: str  # the cache's folder (unchanged)
    cache_id: str  # its new id: that of a one-shot build with the final settings
    previous_id: str
    views_computed: int  # views the teacher ran on
    seconds: float
    aliases: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)


def run_extend(cfg: ExtendConfig) -> ExtendResult:
    """``kdcache extend``: new ensemble members when ``cfg.teacher`` names some, else views and features."""
    cfg.validate()
    common = dict(batch_size=cfg.batch_size, device=cfg.device, progress=cfg.progress, wait=cfg.wait,
                  break_lock=cfg.break_lock, dataset=cfg.dataset)
    if cfg.teacher:
        return add_members(cfg.cache, list(cfg.teacher), list(cfg.weights), **common)
    return extend(cfg.cache, views=cfg.views, features=tuple(cfg.features), weights=list(cfg.weights) or None,
                  **common)


def extend(
    path: str, views: int | None = None, features: Sequence[str] = (), weights: Sequence[str] | None = None,
    teacher: torch.nn.Module | Sequence[torch.nn.Module] | None = None, batch_size: int = ExtendConfig.batch_size,
    device: str = ExtendConfig.device, progress: bool = True, wait: bool = False, break_lock: bool = False,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None, dataset: str | None = None,
) -> ExtendResult:
    """Grow the complete cache at ``path`` to ``views`` views and/or add ``features`` (module docstring);
    ``dataset`` is the data's spec where it moved since the cache was made (its fingerprint must match)."""
    began = time.perf_counter()
    cache, source = _open(path, dataset)
    old = cache.manifest
    k, k2 = cache.views, views or cache.views
    if k2 < k:
        raise InvalidSpec(f"--views {k2} is fewer than the cache's {k} — extend only adds views")
    modes = parse_features(tuple(features))
    present = set(cache.feature_layers())
    if present & set(modes):
        raise InvalidSpec(f"the cache already stores features of {', '.join(sorted(present & set(modes)))} — "
                          "extend adds new layers only")
    if k2 == k and not modes:
        raise InvalidSpec("nothing to extend — give --views K2 (more than the cache's) or --features LAYER[:MODE]")
    if batch_size <= 0:
        raise InvalidSpec(f"--batch-size must be at least 1, got {batch_size}")
    _check_params(cache, Recipe.from_manifest(old["recipe"]["augment"]), np.arange(k), int(old["recipe"]["seed"]))
    net = load_recorded(old, weights, teacher)
    size = int(old["recipe"]["input_size"])
    spec = "+".join(m["spec"] for m in old["teacher"]["members"])
    entries = feature_entries(net, spec, modes, (source.channels, size, size))
    added = feature_specs(entries)

    new = copy.deepcopy(old)
    new["recipe"]["views"] = k2
    new["outputs"]["features"] = [*old["outputs"]["features"], *entries]
    new["layout"]["arrays"] += [layout_entry(s) for s in added]
    if "config" in new:  # the settings a one-shot build of the extended cache takes
        new["config"].update(views=k2, features=[*new["config"].get("features", []), *features])
    change = {"views": [k, k2]} if k2 > k else {}
    if entries:
        change["features"] = [f"{f['layer']}:{f['mode']}" for f in entries]
    _record(cache, new, change)

    lock = claim_lock(cache.path, ClaimOptions(wait=wait, break_lock=break_lock))
    try:
        if k2 > k:
            cache.grow_views(k2)
        for s in added:
            cache.add_array(s, k2)
        computed = _compute(cache, net, source, new, k, k2, [s.name for s in added], batch_size,
                            pick_device(device), progress, on_batch, lock)
        cache.save_manifest(new)
    finally:
        lock.release()
    return ExtendResult(cache.path, new["cache_id"], old["cache_id"], computed, time.perf_counter() - began,
                        publish_aliases(cache.path, new), new)


def _open(path: str, dataset: str | None) -> tuple[CacheWriter, data.Source]:
    """The complete cache at ``path``, opened for writing, and its dataset (``dataset``, else the recorded
    spec; checked by fingerprint)."""
    cache = open_writer(path)
    m = cache.manifest
    refuse_imported(m, cache.path, "extend")
    if "he_extra" in m["recipe"]:
        raise InvalidSpec("extend cannot grow a cache with --extra-views (their choice depends on every view) "
                          "— precompute the larger cache instead")
    source = data.open_source(dataset or m["dataset"]["spec"])
    cache.check_dataset(source.spec, source.fingerprint, source.num_classes, len(source.train), source.parts)
    cache.check_readable()
    return cache, source


def _record(cache: CacheWriter, new: dict[str, Any], change: dict[str, Any]) -> None:
    """Give ``new`` its id and a ``history`` entry for ``change``, noting a format it brings forward."""
    if cache.stored_format < FORMAT_VERSION:
        change = {**change, "format": [cache.stored_format, FORMAT_VERSION]}
    record_change(new, cache.id, change)


def add_members(
    path: str, teacher: Sequence[str], weights: Sequence[str], batch_size: int = ExtendConfig.batch_size,
    device: str = ExtendConfig.device, progress: bool = True, wait: bool = False, break_lock: bool = False,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None, dataset: str | None = None,
) -> ExtendResult:
    """Add ensemble members to a cache made with ``--keep-members``, running only the new members
    (``dataset``: as for :func:`extend`).

    The ensemble target (and energy) is recombined from the stored members' logits and the new
    members' float32 logits: exactly a one-shot build when members are stored as float32
    (``--logit-dtype float32``), within the storage rounding of the stored members' logits otherwise.
    """
    began = time.perf_counter()
    cache, source = _open(path, dataset)
    old = cache.manifest
    kept = old["outputs"].get("members")
    if not kept:
        raise InvalidSpec("adding a teacher needs an ensemble cache made with --keep-members (the combined target "
                          "is recomputed from the stored members) — precompute the larger ensemble instead")
    if batch_size <= 0:
        raise InvalidSpec(f"--batch-size must be at least 1, got {batch_size}")
    _check_params(cache, Recipe.from_manifest(old["recipe"]["augment"]), np.arange(cache.views),
                  int(old["recipe"]["seed"]))
    nets, entries = [], []
    for spec, file in member_pairs(teacher, weights):
        mapped = old["teacher"].get("class_map")
        net, section, _ = load_teachers(spec, file, source.num_classes, source.channels,
                                        class_map=mapped["indices"] if mapped else None)
        nets.append(net)
        entries += section["members"]
    first = len(old["teacher"]["members"])
    names = [f"members/{first + j}/logits" for j in range(len(nets))]
    added = [ArraySpec(name, (source.num_classes,), storage_dtype(kept["dtype"]), kept["dtype"]) for name in names]

    new = copy.deepcopy(old)
    new["teacher"]["members"] += entries
    new["outputs"]["members"]["arrays"] += names
    new["layout"]["arrays"] += [layout_entry(s) for s in added]
    if "config" in new:
        listed = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731
        new["config"].update(teacher=listed(new["config"]["teacher"]) + list(teacher),
                             weights=listed(new["config"]["weights"]) + list(weights))
    _record(cache, new, {"teachers": [e["spec"] for e in entries]})

    lock = claim_lock(cache.path, ClaimOptions(wait=wait, break_lock=break_lock))
    try:
        for s in added:
            cache.add_array(s, cache.views)
        computed = _recombine(cache, nets, source, new, batch_size, pick_device(device), progress, on_batch, lock)
        cache.save_manifest(new)
    finally:
        lock.release()
    return ExtendResult(cache.path, new["cache_id"], old["cache_id"], computed, time.perf_counter() - began,
                        publish_aliases(cache.path, new), new)


def _run(cache: CacheWriter, teacher: torch.nn.Module, source: data.Source, manifest: dict[str, Any], outputs: dict[str, Any],
         views: np.ndarray, write: Callable[[Shard, dict[str, np.ndarray]], None], batch_size: int,
         device: torch.device, progress: bool, on_batch: OnBatch | None, lock: WriterLock,
         forward: Callable[[torch.Tensor, ViewBatch], tuple[torch.Tensor, list[torch.Tensor]]] | None = None) -> int:
    """The teacher pass over ``views`` of every shard, with the cache's recipe; ``write`` takes each shard."""
    recipe = Recipe.from_manifest(manifest["recipe"]["augment"])
    renderer = Renderer.for_model(source.train.bound(cache.input_checksums(), cache.path), recipe,
                                  Preprocess.from_manifest(manifest["recipe"]),
                                  recorded_decode(manifest["recipe"]))
    return run_shards(teacher, renderer, cache_shards(cache, views), outputs, write, batch_size=batch_size,
                      before_write=lock.check, seed=int(manifest["recipe"]["seed"]), num_samples=cache.num_samples,
                      device=device, workers=loader_workers(None, device), forward=forward, progress=progress,
                      desc="extend", on_batch=on_batch)


def _check_params(cache: CacheWriter, recipe: Recipe, views: np.ndarray, seed: int) -> None:
    """CacheCorrupt unless the stored params of ``views`` are the ones the recipe draws from the seed: extend
    renders fresh draws, so outputs added beside edited params would describe other views than theirs."""
    for start in range(0, cache.num_samples, cache.chunk_samples):
        stop = min(start + cache.chunk_samples, cache.num_samples)
        samples = np.repeat(np.arange(start, stop, dtype=np.int64), len(views))
        fresh = recipe.sample(seed, samples, np.tile(views, stop - start), cache.num_samples)
        for name, values in fresh.items():
            stored = cache.read_samples(f"aug/{name}", start, stop, bound=True)[:, views]
            if not np.array_equal(stored.reshape(values.shape), values):
                raise CacheCorrupt(f"cache {cache.path}: aug/{name} of samples {start}..{stop - 1} holds params its "
                                   f"recipe ({recipe.spec}) and seed do not draw — the cache was edited; extend adds "
                                   "nothing to it (`kdcache verify --recompute` names the views)")


def _recombine(cache: CacheWriter, nets: list[torch.nn.Module], source: data.Source, manifest: dict[str, Any],
               batch_size: int, device: torch.device, progress: bool, on_batch: OnBatch | None,
               lock: WriterLock) -> int:
    """Run the new members on every view; write their logits, and the target and energy of the grown ensemble."""
    kept = manifest["outputs"]["members"]
    stored, fresh = kept["arrays"][: -len(nets)], kept["arrays"][-len(nets) :]
    nets = [net.to(device).eval() for net in nets]

    held: dict[str, Any] = {"shard": None, "logits": []}  # the stored members' logits of the current shard

    def forward(inputs: torch.Tensor, batch: ViewBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        shard, lo = batch.tag
        if held["shard"] != shard.key:  # read each shard once, not once per batch
            start, stop = shard.first, shard.first + len(shard.samples)
            held["shard"], held["logits"] = shard.key, [
                torch.from_numpy(decode_logits(cache.read_samples(name, start, stop, bound=True), kept["dtype"]))
                .reshape(shard.size, -1) for name in stored]
        old = [z[lo : lo + len(inputs)].to(device) for z in held["logits"]]
        new = [net(inputs).float() for net in nets]
        return combine(old + new, manifest["teacher"]["ensemble"]), new

    outputs = {**manifest["outputs"], "features": [], "members": {**kept, "arrays": fresh}}
    names = [*cache.target_arrays(), "energy", *fresh]

    def write(shard: Shard, arrays: dict[str, np.ndarray]) -> None:
        for name in names:
            cache.write_views(name, shard.first, 0, arrays[name])

    return _run(cache, nets[0], source, manifest, outputs, np.arange(cache.views, dtype=np.int64), write, batch_size,
                device, progress, on_batch, lock, forward)


def _compute(cache: CacheWriter, teacher: torch.nn.Module, source: data.Source, manifest: dict[str, Any], k: int, k2: int,
             added: list[str], batch_size: int, device: torch.device, progress: bool, on_batch: OnBatch | None,
             lock: WriterLock) -> int:
    """Run the teacher on the views that need it and write what is new; the views computed.

    New views get every array; with new feature layers, existing views get those arrays too.
    """
    first = 0 if added else k

    def write(shard: Shard, arrays: dict[str, np.ndarray]) -> None:
        for name, block in arrays.items():
            if k2 > k:
                cache.write_views(name, shard.first, k, block[:, k - first :])
            if name in added and k > 0:
                cache.write_views(name, shard.first, 0, block[:, : k - first])

    return _run(cache, teacher.to(device).eval(), source, manifest, manifest["outputs"],
                np.arange(first, k2, dtype=np.int64), write, batch_size, device, progress, on_batch, lock)
