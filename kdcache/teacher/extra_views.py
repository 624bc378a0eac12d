"""Energy-guided extra views, written at precompute (HE-DA, Kim et al., arXiv 2311.14334).

``precompute --extra-views R:K2[:cutmix|mixup]``: once the K regular views are cached, samples are
ranked by their mean teacher energy over those views (at the temperature of
:func:`kdcache.cache.manifest.energy_temperature`; high energy = low confidence) and the
highest-energy fraction R gets K2 extra *mixed* views whose teacher outputs are cached too.
``train --extra-views`` streams them (kdcache/student/extra_views.py), with no teacher.

Layout (kdcache/cache/view_sets.py, docs/format.md): the extra views mirror every per-view array under
``he/``, with ``he/aug/<field>`` holding the params of the extra-view recipe: the cache's view ops (any
mixing op dropped) followed by ``cutmix`` (λ~Beta(1,1)) or ``mixup:0.2``, mixing every view.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from kdcache.augment import Recipe
from kdcache.augment.mixing import CutMix, MixUp
from kdcache.cache.arrays import ArraySpec, layout_entry
from kdcache.cache.manifest import energy_temperature
from kdcache.cache.store import Cache, CacheWriter
from kdcache.cache.view_sets import EXTRA_PREFIX, EXTRA_VIEW_BASE
from kdcache.data import ImageSet
from kdcache.errors import CacheCorrupt
from kdcache.models.preprocess import Preprocess
from kdcache.teacher.config import ExtraViews
from kdcache.teacher.passes import Shard, run_shards
from kdcache.views import Renderer, recorded_decode

MIX_OPS = {"cutmix": CutMix(), "mixup": MixUp(alpha=0.2)}  # the paper's HE-DA settings (losses.md)


def recipe_for(recipe: Recipe, op: str) -> Recipe:
    """The recipe of the extra views: the cache's view ops, then ``op`` mixing every view."""
    return Recipe((*(o for o in recipe.ops if o.name not in MIX_OPS), MIX_OPS[op]))


def add_to_manifest(manifest: dict[str, Any], extra: ExtraViews | None, recipe: Recipe) -> None:
    """Record ``--extra-views`` under ``recipe.he_extra``, part of the cache id; nothing when ``extra`` is None."""
    if extra is None:
        return
    entry: dict[str, Any] = {"fraction": extra.fraction, "views": extra.views, "op": extra.op}
    entry |= {"energy_temperature": energy_temperature(manifest), "view_base": EXTRA_VIEW_BASE,
              "augment": recipe_for(recipe, entry["op"]).to_manifest()}
    manifest["recipe"]["he_extra"] = entry


def choose(cache: Cache, fraction: float, temperature: float) -> tuple[np.ndarray, float]:
    """(sorted indices of the top-``fraction`` samples by mean energy over the K views, the lowest chosen
    energy). ``M = max(1, round(fraction·N))``; ties go to the lower index."""
    mean = cache.all_energy(temperature).astype(np.float64).mean(axis=1)
    m = min(len(mean), max(1, round(fraction * len(mean))))
    order = np.lexsort((np.arange(len(mean)), -mean))
    return np.sort(order[:m]).astype(np.int64), float(mean[order[m - 1]])


def _layout(cache: CacheWriter, entry: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """Create (or find) the ``he/`` arrays; returns the manifest's ``he`` section."""
    indices, threshold = choose(cache, entry["fraction"], entry["energy_temperature"])
    if "he" in cache.manifest and cache.has_array(f"{EXTRA_PREFIX}status"):
        if not np.array_equal(cache.read_array(f"{EXTRA_PREFIX}indices"), indices):
            raise CacheCorrupt(f"cache {cache.path} chose other HE samples before — delete its he/ folder and rerun")
        return cache.manifest["he"]
    specs = [s for s in cache.array_specs() if not s.name.startswith("aug/")]
    specs += [ArraySpec(f"aug/{name}", tuple(tail), dtype) for name, (tail, dtype) in recipe.fields().items()]
    m, k2 = len(indices), entry["views"]
    chunk = min(cache.chunk_samples, m)
    shard = chunk * max(1, cache.shard_samples // cache.chunk_samples)
    cache.add_view_group(EXTRA_PREFIX, specs, indices, k2, chunk, shard)
    cache.manifest["he"] = {
        "samples": m, "views": k2, "threshold_energy": threshold, "chunk_samples": chunk, "shard_samples": shard,
        "arrays": [layout_entry(dataclasses.replace(s, name=EXTRA_PREFIX + s.name)) for s in specs],
    }
    cache.save_manifest(cache.manifest)
    return cache.manifest["he"]


def add_extra_views(cache: CacheWriter, teacher: torch.nn.Module, images: ImageSet, device: torch.device,
                    batch_size: int = 256, workers: int = 0, progress: bool = True) -> int:
    """Compute and write the extra views the manifest asks for (none without them); returns how many
    were computed. Every regular shard must be done: the choice needs every sample's energy. Extra-view
    shards are written whole and marked done in ``he/status``, so a rerun resumes them."""
    entry = cache.manifest["recipe"].get("he_extra")
    if entry is None:
        return 0
    recipe = Recipe.from_manifest(entry["augment"])
    he = _layout(cache, entry, recipe)
    indices = cache.read_array(f"{EXTRA_PREFIX}indices")
    rows, views = int(he["shard_samples"]), EXTRA_VIEW_BASE + np.arange(int(he["views"]), dtype=np.int64)
    todo = np.flatnonzero(cache.read_array(f"{EXTRA_PREFIX}status") == 0).tolist()
    shards = [Shard(s, s * rows, indices[s * rows : (s + 1) * rows], views) for s in todo]
    rec = cache.manifest["recipe"]

    def write(shard: Shard, arrays: dict[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            cache.write_views(EXTRA_PREFIX + name, shard.first, 0, values)
        cache.mark_done(f"{EXTRA_PREFIX}status", shard.key)

    return run_shards(teacher, Renderer.for_model(images, recipe, Preprocess.from_manifest(rec), recorded_decode(rec)), shards,
                      cache.manifest["outputs"], write, batch_size=batch_size, seed=int(rec["seed"]),
                      num_samples=cache.num_samples, device=device, workers=workers, progress=progress,
                      desc="extra views")
