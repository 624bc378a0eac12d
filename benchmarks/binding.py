"""binding: what binding a cache to its place and its inputs costs a student's reads (format 5,
kdcache/cache/digests.py): the public loader's views/s over a folder of JPEGs, from the same cache bound (the
crc32c of every image decoded and of every chunk read compared) and unbound (a copy whose manifest drops
``layout.bound`` and ``layout.inputs``, as a format-4 cache reads), alternating (ABBA); and the block reads
alone (a training epoch's chunk rounds, no decoding), where the chunk digests are all the difference.

    python -m benchmarks.binding [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import chunk_checks
from benchmarks.common import Clock, Run, device, emit, median, parse_args, ratios, table
from kdcache import loader, models
from kdcache.cache.store import open_cache
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

NAME = "binding"


def folder(root: Path, images: int) -> Path:
    """An image folder of ``images`` JPEGs (4 classes, 96-160 px), and a small val split."""
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", 8)):
        for i in range(count):
            h, w = (int(v) for v in rng.integers(96, 160, size=2))
            pixels = (rng.integers(0, 255, (1, 1, 3)) + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
            target = root / split / f"c{i % 4}"
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(target / f"{i}.jpg", quality=90)
    return root


def unbound(path: str, to: Path) -> str:
    """A copy of the cache at ``path`` that reads as a cache made before format 5."""
    shutil.copytree(path, to)
    meta = to / "zarr.json"
    doc = json.loads(meta.read_text())
    for key in ("bound", "inputs"):
        doc["attributes"]["kdcache"]["layout"].pop(key)
    meta.write_text(json.dumps(doc))
    return str(to)


def epoch(path: str, dataset: str, view: int) -> Run:
    stream = loader(path, dataset, batch_size=64)
    stream.dataset.set_epoch(view)
    clock, n = Clock(), 0
    for batch in stream:
        n += len(batch["index"])
    wall, cpu = clock.read()
    return Run(n, wall, cpu)


def blocks(path: str) -> Run:
    return chunk_checks.epoch(open_cache(path))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    dev = device("cpu")
    images, views = (512, 2) if args.quick else (2048, 4)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        dataset = f"imagefolder:{folder(Path(tmp) / 'pets', images)}"
        torch.manual_seed(0)
        torch.save(models.create_model("cnn", 4, 3).state_dict(), Path(tmp) / "cnn.pt")
        bound = precompute(PrecomputeConfig(dataset=dataset, teacher="cnn", weights=str(Path(tmp) / "cnn.pt"),
                                            out=str(Path(tmp) / "c"), views=views, logits="topk:4", teacher_size=64,
                                            batch_size=256, progress=False)).path
        plain = unbound(bound, Path(tmp) / "plain")
        runs: dict[str, list[Run]] = {"bound": [], "unbound": []}
        reads: dict[str, list[Run]] = {"bound": [], "unbound": []}
        for rep in range(args.reps):  # ABBA: the first run of a pair is slower, whichever it is
            for name in (("bound", "unbound") if rep % 2 == 0 else ("unbound", "bound")):
                path = bound if name == "bound" else plain
                runs[name].append(epoch(path, dataset, rep % views))
                reads[name].append(blocks(path))
        bytes_bound = sum(f.stat().st_size for f in Path(bound).rglob("*") if f.is_file())
        bytes_plain = sum(f.stat().st_size for f in Path(bound).rglob("*") if f.is_file()
                          and not f.relative_to(bound).as_posix().startswith(("digests/", "inputs/")))
    loads = ratios(runs["bound"], runs["unbound"])
    block = ratios(reads["bound"], reads["unbound"])
    rows = [{"cache": name, "loader_views_per_s": median(r.rate for r in runs[name]),
             "block_reads_views_per_s": median(r.rate for r in reads[name])} for name in runs]
    text = (f"binding — {images} JPEGs 96-160 px, {views} views at 64 px, top-4, local disk, one process, load "
            f"{os.getloadavg()[0]:.2f}\n" + table(rows, ["cache", "loader_views_per_s", "block_reads_views_per_s"])
            + f"\nloader bound / unbound: {loads['ratio']:.3f} (best runs {loads['ratio_best']:.3f})"
            + f"\nblock reads bound / unbound: {block['ratio']:.3f} (best runs {block['ratio_best']:.3f})"
            + f"\nstored bytes: {bytes_bound:,} bound, {bytes_plain:,} without digests and inputs "
              f"(+{100 * (bytes_bound / bytes_plain - 1):.1f} %)")
    return emit(NAME, args, dev, {"images": images, "views": views, "load_average": os.getloadavg()[0],
                                  "loader": loads, "block_reads": block, "bytes_bound": bytes_bound,
                                  "bytes_unbound": bytes_plain,
                                  "loader_views_per_s": {k: [r.rate for r in v] for k, v in runs.items()},
                                  "block_views_per_s": {k: [r.rate for r in v] for k, v in reads.items()}}, text)


if __name__ == "__main__":
    main()
