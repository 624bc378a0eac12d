"""The families of views a cache stores: the K regular views of every sample and, when precompute
was given ``--extra-views``, the energy-guided extra mixed views of some samples (HE-DA).

Extra views live under ``he/`` (``he/indices [M]``, ``he/status``, and ``he/<array> [M, K2, ...]`` for
every per-view array); extra view v of a sample samples its params as view index
``EXTRA_VIEW_BASE + v``, never the index of a regular view however many views a cache grows to.
Stage 1 writes them, stage 2 streams them, the auditor replays them: all through this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.augment import Recipe
from kdcache.cache.store import Cache

EXTRA_PREFIX = "he/"
EXTRA_VIEW_BASE = 1 << 31


@dataclass(frozen=True)
class ViewSet:
    """A family of cached views: arrays under ``prefix``, row r is sample ``samples[r]``, its view v was
    sampled as view index ``view_base + v`` of ``recipe``; stored in chunks of ``chunk_samples`` rows."""

    name: str
    prefix: str
    recipe: Recipe
    samples: np.ndarray
    views: int
    view_base: int
    chunk_samples: int


def regular_views(cache: Cache, allow_version_drift: bool = False) -> ViewSet:
    """The regular views of the cache's written shards (``allow_version_drift``: see Recipe.from_manifest)."""
    done = np.repeat(cache.shards_done(), cache.shard_samples)[: cache.num_samples]
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"], allow_version_drift)
    return ViewSet("view", "", recipe, np.flatnonzero(done), cache.views, 0, cache.chunk_samples)


def extra_views(cache: Cache, allow_version_drift: bool = False) -> ViewSet | None:
    """The cache's extra views, or None when it has none (or they are not laid out yet)."""
    entry, he = cache.manifest["recipe"].get("he_extra"), cache.manifest.get("he")
    if entry is None or he is None:
        return None
    samples = cache.read_array(f"{EXTRA_PREFIX}indices").astype(np.int64)
    return ViewSet("extra view", EXTRA_PREFIX, Recipe.from_manifest(entry["augment"], allow_version_drift), samples,
                   int(he["views"]), EXTRA_VIEW_BASE, int(he["chunk_samples"]))


def view_sets(cache: Cache, allow_version_drift: bool = False) -> list[ViewSet]:
    """The regular views of the written shards and, when the cache has them, the extra views."""
    extra = extra_views(cache, allow_version_drift)
    return [regular_views(cache, allow_version_drift), *([extra] if extra is not None else [])]
