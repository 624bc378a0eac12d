"""The golden caches: fixed teachers, recipes and seeds must give the same bytes in every array.

``tests/golden/caches.json`` holds the cache id and the sha256 of each array's decoded bytes for three
small builds (dense logits with mixing, features and extra views; sampled logits; a top-k ensemble
with kept members). A refactor that changes any stored byte, or any cache id, fails here.
Regenerate only for an intended format change: ``KDCACHE_WRITE_GOLDEN=1 pytest tests/test_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from tests_support import save_cnn_teacher

from kdcache import PrecomputeConfig, open_cache, precompute
from kdcache.teacher.extend import add_members, extend

GOLDEN = Path(__file__).parent / "golden" / "caches.json"

BUILDS = {
    "dense-mix-features-extra": dict(
        augment="rrc+flip+cutmix", views=3, logits="dense", features=("layer1:attention", "layer2:full"),
        extra_views="0.5:2"),
    "sampled-pooled": dict(augment="rrc+flip", views=2, logits="sampled:20", features=("layer2:pooled",)),
    "topk-ensemble-members": dict(augment="rrc+mixup", views=2, logits="topk:3", logit_dtype="bfloat16",
                                  keep_members=True),
}


def _hashes(path: str) -> dict[str, object]:
    cache = open_cache(path)
    names = ["labels", *cache.array_names]
    if cache.manifest.get("he"):
        names += ["he/indices", *(a["name"] for a in cache.manifest["he"]["arrays"])]
    arrays = {name: hashlib.sha256(np.ascontiguousarray(cache.read_array(name)).tobytes()).hexdigest()
              for name in names}
    return {"cache_id": cache.id, "arrays": arrays}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("golden-teachers")
    return [save_cnn_teacher(folder, f"t{seed}.pt", seed=seed, scale=8) for seed in (11, 12, 13)]


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_golden_cache_bytes_are_unchanged(build, teachers, tmp_path):
    settings = dict(BUILDS[build])
    ensemble = settings.get("keep_members", False)
    cfg = PrecomputeConfig(dataset="fake:48", teacher=("cnn", "cnn") if ensemble else "cnn",
                           weights=tuple(teachers[:2]) if ensemble else teachers[0], out=str(tmp_path), seed=7,
                           batch_size=20, chunk_samples=8, progress=False, **settings)
    _check(build, _hashes(precompute(cfg).path))


def test_golden_extended_caches_are_unchanged(teachers, tmp_path):
    """extend (views and features) and add_members write the same bytes as before."""
    base = dict(dataset="fake:48", out=str(tmp_path), seed=7, batch_size=20, chunk_samples=8, progress=False)
    grown = precompute(PrecomputeConfig(teacher="cnn", weights=teachers[0], views=2, logits="sampled:20",
                                        **base)).path
    extend(grown, views=3, features=("layer1:attention",), batch_size=20, progress=False)
    _check("extended-views-features", _hashes(grown))
    members = precompute(PrecomputeConfig(teacher=("cnn", "cnn"), weights=tuple(teachers[:2]), views=2,
                                          logits="topk:3", logit_dtype="float32", keep_members=True, **base)).path
    add_members(members, ["cnn"], [teachers[2]], batch_size=20, progress=False)
    _check("added-member", _hashes(members))


def _check(build: str, got: dict[str, object]) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("KDCACHE_WRITE_GOLDEN"):
        golden[build] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert build in golden, f"no golden hashes for {build} — generate them with KDCACHE_WRITE_GOLDEN=1"
    assert got["cache_id"] == golden[build]["cache_id"]
    assert got["arrays"] == golden[build]["arrays"]
