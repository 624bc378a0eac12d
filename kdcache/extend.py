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
from tqdm import tqdm

from kdcache import data
from kdcache.augment import Recipe
from kdcache.errors import CacheMismatch, InvalidSpec, WeightsMismatch
from kdcache.lock import WriterLock
from kdcache.precompute import (
    FeatureTap, _map_codec, batch_outputs, class_uniforms, energy, feature_entries, parse_features, pick_device,
    teacher_targets,
)
from kdcache.roots import alias_name, write_alias
from kdcache.store import ArraySpec, Cache, cache_id, decode_logits, open_cache, provenance, storage_dtype
from kdcache.teachers import combine, load_teachers, member_pairs, stored_logits
from kdcache.views import Renderer


@dataclass
class ExtendResult:
    path: str  # the cache's folder (unchanged)
    cache_id: str  # its new id: that of a one-shot build with the final settings
    previous_id: str
    views_computed: int  # views the teacher ran on
    seconds: float
    aliases: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)


def _teacher(manifest: dict[str, Any], source: data.Source, weights: Sequence[str] | None,
             modules: torch.nn.Module | Sequence[torch.nn.Module] | None) -> torch.nn.Module:
    """The cache's teacher rebuilt from its manifest, refusing weights whose hash is not the recorded one."""
    members = manifest["teacher"]["members"]
    files = list(weights) if weights else [m.get("weights") for m in members]
    if modules is None and any(f is None for f in files):
        raise InvalidSpec("the cache was made from teacher modules, not weights files — pass the modules "
                          "(extend(..., teacher=...)) or --weights FILE per member")
    if modules is None and len(files) != len(members):
        raise InvalidSpec(f"the cache has {len(members)} teachers but {len(files)} --weights were given — "
                          "give one --weights per teacher, in the manifest's order")
    module, section = load_teachers([m["spec"] for m in members], None if modules is not None else files,
                                    source.num_classes, source.channels, manifest["teacher"]["ensemble"] or "mean-prob",
                                    "members" in manifest["outputs"], modules=modules)
    for have, want in zip(section["members"], members):
        if have["sha256"] != want["sha256"]:
            raise WeightsMismatch(f"teacher {want['spec']} weights {have.get('weights') or '(module)'} hash to "
                                  f"{have['sha256'][:19]}…, the cache was made with {want['sha256'][:19]}… — "
                                  "pass the weights the cache was made with (--weights)")
    return module


def extend(
    path: str, views: int | None = None, features: Sequence[str] = (), weights: Sequence[str] | None = None,
    teacher: torch.nn.Module | Sequence[torch.nn.Module] | None = None, batch_size: int = 256,
    device: str = "auto", progress: bool = True, wait: bool = False, break_lock: bool = False,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> ExtendResult:
    """Grow the complete cache at ``path`` to ``views`` views and/or add ``features`` (module docstring)."""
    began = time.perf_counter()
    cache, source = _open(path)
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
    net = _teacher(old, source, weights, teacher)
    size = int(old["recipe"]["input_size"])
    spec = "+".join(m["spec"] for m in old["teacher"]["members"])
    entries = feature_entries(net, spec, modes, (source.channels, size, size))
    added = [ArraySpec(f["array"], tuple(f["shape"]), "float16", **_map_codec(f["mode"])) for f in entries]

    new = copy.deepcopy(old)
    new["recipe"]["views"] = k2
    new["outputs"]["features"] = [*old["outputs"]["features"], *entries]
    new["layout"]["arrays"] += [{"name": s.name, "tail": list(s.tail), "dtype": s.dtype, "logical_dtype": s.dtype,
                                 "codec": f"{s.codec}:{s.level}"} for s in added]
    if "config" in new:  # the settings a one-shot build of the extended cache takes
        new["config"].update(views=k2, features=[*new["config"].get("features", []), *features])
    change = {"views": [k, k2]} if k2 > k else {}
    if entries:
        change["features"] = [f"{f['layer']}:{f['mode']}" for f in entries]
    _record(old, new, change)

    lock = WriterLock(cache.path, wait=wait, break_stale=break_lock).acquire()
    try:
        if k2 > k:
            cache.grow_views(k2)
        for s in added:
            cache.add_array(s, k2)
        computed = _compute(cache, net, source, new, modes, k, k2, [s.name for s in added], batch_size,
                            pick_device(device), progress, on_batch, lock)
        cache.save_manifest(new)
    finally:
        lock.release()
    return ExtendResult(cache.path, new["cache_id"], old["cache_id"], computed, time.perf_counter() - began,
                        _publish(cache.path, new), new)


def _open(path: str) -> tuple[Cache, data.Source]:
    """The complete cache at ``path``, opened for writing, and its dataset (checked by fingerprint)."""
    cache = open_cache(path, mode="r+")
    m = cache.manifest
    if "he_extra" in m["recipe"]:
        raise InvalidSpec("extend cannot grow a cache with --he-extra views (their choice depends on every view) "
                          "— precompute the larger cache instead")
    source = data.open_source(m["dataset"]["spec"])
    if source.fingerprint != m["dataset"]["fingerprint"]:
        raise CacheMismatch(f"dataset {source.spec} has fingerprint {source.fingerprint[:19]}…, the cache was made "
                            f"from {m['dataset']['fingerprint'][:19]}… — extend needs the same data")
    return cache, source


def _record(old: dict[str, Any], new: dict[str, Any], change: dict[str, Any]) -> None:
    """Give ``new`` its id and a ``history`` entry for ``change``."""
    new["cache_id"] = cache_id(new)
    prov = provenance()
    new.setdefault("history", []).append({**change, "previous_id": old["cache_id"], "cache_id": new["cache_id"],
                                          "kdcache": prov["kdcache"], "host": prov["host"],
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _publish(path: str, manifest: dict[str, Any]) -> list[str]:
    """Alias files ``ROOT/<readable alias>`` and ``ROOT/<new id>`` naming the cache's folder."""
    root, _, folder = path.rstrip("/").rpartition("/")
    aliases = [write_alias(root, alias_name(manifest, manifest["cache_id"]), folder)]
    if manifest["cache_id"] != folder:
        aliases.append(write_alias(root, manifest["cache_id"], folder))
    return aliases


def add_members(
    path: str, teacher: Sequence[str], weights: Sequence[str], batch_size: int = 256, device: str = "auto",
    progress: bool = True, wait: bool = False, break_lock: bool = False,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> ExtendResult:
    """Add ensemble members to a cache made with ``--keep-members``, running only the new members.

    The ensemble target (and energy) is recombined from the stored members' logits and the new
    members' float32 logits: exactly a one-shot build when members are stored as float32
    (``--logit-dtype float32``), within the storage rounding of the stored members' logits otherwise.
    """
    began = time.perf_counter()
    cache, source = _open(path)
    old = cache.manifest
    kept = old["outputs"].get("members")
    if not kept:
        raise InvalidSpec("adding a teacher needs an ensemble cache made with --keep-members (the combined target "
                          "is recomputed from the stored members) — precompute the larger ensemble instead")
    if batch_size <= 0:
        raise InvalidSpec(f"--batch-size must be at least 1, got {batch_size}")
    nets, entries = [], []
    for spec, file in member_pairs(teacher, weights):
        net, section = load_teachers(spec, file, source.num_classes, source.channels)
        nets.append(net)
        entries += section["members"]
    first = len(old["teacher"]["members"])
    names = [f"members/{first + j}/logits" for j in range(len(nets))]
    added = [ArraySpec(name, (source.num_classes,), storage_dtype(kept["dtype"]), kept["dtype"]) for name in names]

    new = copy.deepcopy(old)
    new["teacher"]["members"] += entries
    new["outputs"]["members"]["arrays"] += names
    new["layout"]["arrays"] += [{"name": s.name, "tail": list(s.tail), "dtype": s.dtype,
                                 "logical_dtype": s.logical or s.dtype, "codec": f"{s.codec}:{s.level}"} for s in added]
    if "config" in new:
        listed = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731
        new["config"].update(teacher=listed(new["config"]["teacher"]) + list(teacher),
                             weights=listed(new["config"]["weights"]) + list(weights))
    _record(old, new, {"teachers": [e["spec"] for e in entries]})

    lock = WriterLock(cache.path, wait=wait, break_stale=break_lock).acquire()
    try:
        for s in added:
            cache.add_array(s, cache.views)
        computed = _recombine(cache, nets, source, new, batch_size, pick_device(device), progress, on_batch, lock)
        cache.save_manifest(new)
    finally:
        lock.release()
    return ExtendResult(cache.path, new["cache_id"], old["cache_id"], computed, time.perf_counter() - began,
                        _publish(cache.path, new), new)


def _recombine(cache: Cache, nets: list[torch.nn.Module], source: data.Source, manifest: dict[str, Any],
               batch_size: int, device: torch.device, progress: bool,
               on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None, lock: WriterLock) -> int:
    """Run the new members on every view; write their logits, and the target and energy of the grown ensemble."""
    recipe = Recipe.from_manifest(manifest["recipe"]["augment"])
    seed, n, k = int(manifest["recipe"]["seed"]), cache.num_samples, cache.views
    outputs, kept = manifest["outputs"], manifest["outputs"]["members"]
    draws = outputs["logits"]["draws"] if outputs["logits"]["mode"] == "sampled" else 0
    stored, fresh = kept["arrays"][: -len(nets)], kept["arrays"][-len(nets) :]
    renderer = Renderer(source.train, recipe, int(manifest["recipe"]["input_size"]), source.mean, source.std)
    nets = [net.to(device).eval() for net in nets]
    computed = 0
    with torch.inference_mode(), tqdm(total=n * k, unit="view", desc="extend", disable=not progress,
                                      dynamic_ncols=True) as bar:
        for shard in range(cache.num_shards):
            start, stop = cache.shard_range(shard)
            old_logits = [torch.from_numpy(decode_logits(cache.read_samples(name, start, stop), kept["dtype"]))
                          .reshape((stop - start) * k, -1) for name in stored]
            idx_all, vs_all = np.repeat(np.arange(start, stop), k), np.tile(np.arange(k), stop - start)
            parts = []
            for lo in range(0, len(idx_all), batch_size):
                idx, vs = idx_all[lo : lo + batch_size], vs_all[lo : lo + batch_size]
                inputs = renderer.batch(idx, recipe.sample(seed, idx, vs, n)).to(device)
                new_logits = [net(inputs).float() for net in nets]
                logits = combine([z[lo : lo + len(idx)].to(device) for z in old_logits] + new_logits,
                                 manifest["teacher"]["ensemble"])
                if on_batch is not None:
                    on_batch(inputs, logits)
                uniforms = torch.as_tensor(class_uniforms(seed, idx, vs, draws)).to(device) if draws else None
                part = {**teacher_targets(logits, outputs["logits"], uniforms),
                        "energy": energy(logits, tuple(outputs["energy"]["temperatures"])).cpu().numpy()}
                part.update({name: stored_logits(z, kept["dtype"]) for name, z in zip(fresh, new_logits)})
                parts.append(part)
                bar.update(len(idx))
                computed += len(idx)
            lock.check()
            for name in parts[0]:
                values = np.concatenate([p[name] for p in parts])
                cache.write_views(name, start, 0, values.reshape(stop - start, k, *values.shape[1:]))
    return computed


def _compute(cache: Cache, teacher: torch.nn.Module, source: data.Source, manifest: dict[str, Any],
             modes: dict[str, str], k: int, k2: int, added: list[str], batch_size: int, device: torch.device,
             progress: bool, on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None, lock: WriterLock) -> int:
    """Run the teacher shard by shard on the views that need it and write what is new; the views computed.

    New views get every array; with new feature layers, existing views get those arrays too.
    """
    recipe = Recipe.from_manifest(manifest["recipe"]["augment"])
    seed, n = int(manifest["recipe"]["seed"]), cache.num_samples
    outputs = manifest["outputs"]
    draws = outputs["logits"]["draws"] if outputs["logits"]["mode"] == "sampled" else 0
    renderer = Renderer(source.train, recipe, int(manifest["recipe"]["input_size"]), source.mean, source.std)
    first = 0 if added else k
    views = np.arange(first, k2)
    teacher = teacher.to(device).eval()
    tap = FeatureTap(teacher, {f["layer"]: f["mode"] for f in outputs["features"]})
    computed = 0
    try:
        with torch.inference_mode(), tqdm(total=n * len(views), unit="view", desc="extend", disable=not progress,
                                          dynamic_ncols=True) as bar:
            for shard in range(cache.num_shards):
                start, stop = cache.shard_range(shard)
                idx_all = np.repeat(np.arange(start, stop), len(views))
                vs_all = np.tile(views, stop - start)
                parts = []
                for lo in range(0, len(idx_all), batch_size):
                    idx, vs = idx_all[lo : lo + batch_size], vs_all[lo : lo + batch_size]
                    params = recipe.sample(seed, idx, vs, n)
                    inputs = renderer.batch(idx, params)
                    logits = teacher(inputs.to(device)).float()
                    if on_batch is not None:
                        on_batch(inputs, logits)
                    uniforms = torch.as_tensor(class_uniforms(seed, idx, vs, draws)).to(device) if draws else None
                    parts.append(batch_outputs(teacher, tap, logits, outputs, uniforms, params))
                    bar.update(len(idx))
                    computed += len(idx)
                lock.check()
                for name in parts[0]:
                    values = np.concatenate([p[name] for p in parts])
                    block = values.reshape(stop - start, len(views), *values.shape[1:])
                    if k2 > k:
                        cache.write_views(name, start, k, block[:, k - first :])
                    if name in added and k > 0:
                        cache.write_views(name, start, 0, block[:, : k - first])
    finally:
        tap.close()
    return computed
