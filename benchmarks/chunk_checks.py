"""chunk_checks: what refusing missing chunks costs a training epoch's reads (kdcache/cache/chunks.py).

One epoch of chunk-sized ``Cache.read_blocks`` rounds (the training reader's access pattern: every
per-view array, one view per sample), with the per-read check against the chunk listing on and off,
in alternating order (ABBA: the first of a pair runs slower, whichever it is). The listings are made once per process (as a training process or loader worker does),
so they are timed apart: one array's listing, and ``Cache.check_readable`` (every array's, the check
train runs before it starts).

    python -m benchmarks.chunk_checks [--quick]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Clock, Run, device, emit, median, parse_args, ratios, table
from kdcache import data, models
from kdcache.cache.chunks import ChunkIndex
from kdcache.cache.store import Cache, open_cache
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

NAME = "chunk_checks"


def epoch(cache: Cache) -> Run:
    """Read one view of every sample of every per-view array, in rounds of 8 blocks."""
    clock = Clock()
    s, n = cache.chunk_samples, cache.num_samples
    blocks = [(a, min(a + s, n), (a // s) % cache.views) for a in range(0, n, s)]
    for lo in range(0, len(blocks), 8):
        cache.read_blocks(cache.array_names, blocks[lo:lo + 8])
    wall, cpu = clock.read()
    return Run(n, wall, cpu)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    dev = device("cpu")
    samples, views = (4096, 4) if args.quick else (16384, 8)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        dataset = f"fake:{samples}:100:8"
        source = data.open_source(dataset)
        torch.manual_seed(0)
        weights = Path(tmp) / "cnn.pt"
        torch.save(models.create_model("cnn", 100, source.channels).state_dict(), weights)
        path = precompute(PrecomputeConfig(dataset=dataset, teacher="cnn", weights=str(weights), out=str(Path(tmp) / "c"),
                                           views=views, logits="topk:10", chunk_samples=64, batch_size=1024,
                                           progress=False)).path
        cache = open_cache(path)
        files = sum(len(f) for _, _, f in os.walk(path))
        checked, unchecked = open_cache(path), open_cache(path)
        checked.check_readable()  # the listings, once per process as in training (timed below)
        unchecked.check_chunks = False
        runs: dict[str, list[Run]] = {"checked": [], "unchecked": []}
        for rep in range(args.reps):  # ABBA: the first read of a pair is slower, whichever it is
            for name in (("checked", "unchecked") if rep % 2 == 0 else ("unchecked", "checked")):
                runs[name].append(epoch(checked if name == "checked" else unchecked))
        listing, readable = [], []
        for _ in range(args.reps):
            clock = Clock()
            ChunkIndex(cache.group[cache.array_names[0]], cache.array_names[0])
            listing.append(clock.read()[0])
            clock = Clock()
            open_cache(path).check_readable()
            readable.append(clock.read()[0])
    ratio = ratios(runs["checked"], runs["unchecked"])
    rows = [{"reads": name, "views_per_s": median(r.rate for r in measured)} for name, measured in runs.items()]
    text = (f"chunk checks — fake:{samples}:100:8, {views} views, top-10, chunks of 64 samples, "
            f"{files} files, local disk, load {os.getloadavg()[0]:.2f}\n" + table(rows, ["reads", "views_per_s"])
            + f"\nchecked / unchecked throughput: {ratio['ratio']:.3f} (best runs {ratio['ratio_best']:.3f})"
            + f"\none listing: {median(listing) * 1e3:.1f} ms; check_readable: {median(readable) * 1e3:.1f} ms")
    return emit(NAME, args, dev, {"samples": samples, "views": views, "files": files,
                                  "load_average": os.getloadavg()[0], **ratio,
                                  "listing_seconds": median(listing), "check_readable_seconds": median(readable),
                                  "views_per_s": {name: [r.rate for r in m] for name, m in runs.items()}}, text)


if __name__ == "__main__":
    main()
