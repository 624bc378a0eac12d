"""The golden caches: fixed teachers, recipes and seeds must give the same bytes in every array.

``tests/golden/caches.json`` holds the cache id and the sha256 of each array's decoded bytes for five
small builds (dense logits with mixing, features and extra views; sampled logits; a top-k ensemble with
kept members; extend; add_members), made by tests/golden/builds.py in its own process with the float
kernels pinned (its docstring says why). A refactor that changes any stored byte, or any cache id,
fails here. Regenerate only for an intended format change: ``KDCACHE_WRITE_GOLDEN=1 pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "caches.json"
BUILDS = Path(__file__).parent / "golden" / "builds.py"
NAMES = ("added-member", "dense-mix-features-extra", "extended-views-features", "sampled-pooled",
         "topk-ensemble-members")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict[str, object]]:
    sys.path.insert(0, str(BUILDS.parent))
    from builds import PINNED

    out = tmp_path_factory.mktemp("golden")
    run = subprocess.run([sys.executable, str(BUILDS), str(out)], env={**os.environ, **PINNED},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("build", NAMES)
def test_golden_cache_bytes_are_unchanged(build, built):
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("KDCACHE_WRITE_GOLDEN"):
        golden[build] = built[build]
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert build in golden, f"no golden hashes for {build} — generate them with KDCACHE_WRITE_GOLDEN=1"
    assert built[build]["cache_id"] == golden[build]["cache_id"]
    assert built[build]["arrays"] == golden[build]["arrays"]
