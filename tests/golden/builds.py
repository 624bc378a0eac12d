"""The golden builds, run as their own process so the float kernels are pinned before torch starts.

``python tests/golden/builds.py OUT`` prints one JSON object: build -> cache id and the sha256 of each
array's decoded bytes. tests/test_golden.py runs it under :data:`PINNED` and compares with caches.json.

Teacher outputs are float sums whose last bits depend on the kernels torch picks for the CPU (AVX-512
and AMX machines round differently from AVX2 ones). :data:`PINNED` asks torch, oneDNN and MKL for their
portable kernels on one thread, so that the bytes follow the code rather than the machine's vector units.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
          "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

BUILDS = {
    "dense-mix-features-extra": dict(
        augment="rrc+flip+cutmix", views=3, logits="dense", features=("layer1:attention", "layer2:full"),
        extra_views="0.5:2"),
    "sampled-pooled": dict(augment="rrc+flip", views=2, logits="sampled:20", features=("layer2:pooled",)),
    "topk-ensemble-members": dict(augment="rrc+mixup", views=2, logits="topk:3", logit_dtype="bfloat16",
                                  keep_members=True),
}


def hashes(path: str) -> dict[str, object]:
    import numpy as np

    from kdcache import open_cache

    cache = open_cache(path)
    names = ["labels", *cache.array_names]
    if cache.manifest.get("he"):
        names += ["he/indices", *(a["name"] for a in cache.manifest["he"]["arrays"])]
    names += [f"digests/{name}" for name in names if name not in ("labels", "he/indices")]  # format 5: bound chunks
    names += ["inputs/crc32c"] if cache.binds_inputs else []  # and the teacher's inputs
    arrays = {name: hashlib.sha256(np.ascontiguousarray(cache.read_array(name)).tobytes()).hexdigest()
              for name in names}
    return {"cache_id": cache.id, "arrays": arrays}


def build_all(out: Path) -> dict[str, object]:
    """Every build of BUILDS, then extend (views and features) and add_members: build -> hashes."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests_support import save_cnn_teacher

    from kdcache import PrecomputeConfig, precompute
    from kdcache.teacher.extend import add_members, extend

    torch.set_num_threads(1)
    teachers = [save_cnn_teacher(out, f"t{seed}.pt", seed=seed, scale=8) for seed in (11, 12, 13)]
    base = dict(dataset="fake:48", seed=7, batch_size=20, chunk_samples=8, progress=False)
    got = {}
    for build, settings in sorted(BUILDS.items()):
        ensemble = settings.get("keep_members", False)
        cfg = PrecomputeConfig(teacher=("cnn", "cnn") if ensemble else "cnn",
                               weights=tuple(teachers[:2]) if ensemble else teachers[0], out=str(out / build),
                               **base, **settings)
        got[build] = hashes(precompute(cfg).path)
    grown = precompute(PrecomputeConfig(teacher="cnn", weights=teachers[0], views=2, logits="sampled:20",
                                        out=str(out / "grown"), **base)).path
    extend(grown, views=3, features=("layer1:attention",), batch_size=20, progress=False)
    got["extended-views-features"] = hashes(grown)
    members = precompute(PrecomputeConfig(teacher=("cnn", "cnn"), weights=tuple(teachers[:2]), views=2,
                                          logits="topk:3", logit_dtype="float32", keep_members=True,
                                          out=str(out / "members"), **base)).path
    add_members(members, ["cnn"], [teachers[2]], batch_size=20, progress=False)
    got["added-member"] = hashes(members)
    return got


if __name__ == "__main__":
    print(json.dumps(build_all(Path(sys.argv[1]))))
