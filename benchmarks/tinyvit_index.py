"""The memory of indexing TinyViT's saved logits as the number of epochs grows: the peak of the bytes Python and
NumPy allocate (tracemalloc) while ``kdcache.interop.tinyvit.plan`` reads every epoch folder, and its time.

    python -m benchmarks.tinyvit_index            # 200,000 samples, 4 / 16 / 64 epochs, 2 ranks
    python -m benchmarks.tinyvit_index --quick    # 50,000 samples, 2 / 8 / 32 epochs
    python -m benchmarks.tinyvit_index --samples 1000 --epochs 2,4

The source is generated: per epoch and rank, the keys of a seeded permutation and items of random seeds and
top-5 float16 probabilities, as TinyViT's save_logits.py lays them out, over ``fake:N`` (mixing off). The growth
per sample and epoch is the slope between the smallest and the largest run; an index that keeps no per-epoch
array in memory has a slope near 0. Results: docs/benchmarks.md §13.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import device, emit, parse_args, table

K = 5
RANKS = 2


def write_source(root: Path, n: int, epochs: int) -> None:
    """``logits_top5_epoch<E>/rank<R>-{keys.txt,values.bin}`` for ``n`` samples, each rank every other sample of
    the epoch's permutation."""
    item = np.dtype([("seed", "<i4"), ("ids", "<i2", (K,)), ("probs", "<f2", (K,))])
    rng = np.random.default_rng(0)
    for epoch in range(epochs):
        folder = root / f"logits_top{K}_epoch{epoch}"
        folder.mkdir(parents=True)
        perm = rng.permutation(n)
        for rank in range(RANKS):
            mine = perm[rank::RANKS]
            (folder / f"rank{rank}-keys.txt").write_text("".join(f"{t}\n" for t in mine.tolist()))
            values = np.zeros(len(mine), item)
            values["seed"] = rng.integers(0, 1 << 31, len(mine))
            values["ids"] = np.arange(K)
            values["probs"] = np.float16(0.1)
            values.tofile(folder / f"rank{rank}-values.bin")


def write_config(path: Path) -> Path:
    path.write_text("DATA:\n  IMG_SIZE: 40\n  INTERPOLATION: bicubic\n  MEAN_AND_STD_TYPE: default\n"
                    "AUG:\n  COLOR_JITTER: 0.0\n  AUTO_AUGMENT: none\n  REPROB: 0.0\n  MIXUP: 0.0\n  CUTMIX: 0.0\n"
                    "MODEL:\n  NAME: tiny_vit\nAMP_ENABLE: true\n")
    return path


def measure(root: Path, config: Path, n: int, epochs: int) -> dict[str, Any]:
    from kdcache import data
    from kdcache.interop import tinyvit

    source = data.open_source(f"fake:{n}:10:32")
    tracemalloc.start()
    began = time.perf_counter()
    found = tinyvit.plan(root, source, config, progress=False)
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found.views == epochs
    return {"epochs": epochs, "samples": n, "peak_mib": peak / 2**20, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--samples", type=int, default=None, help="samples of the source (default 200,000)")
        parser.add_argument("--epochs", default=None, help="comma-separated epoch counts (default 4,16,64)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    n, counts = (50_000, (2, 8, 32)) if args.quick else (200_000, (4, 16, 64))
    n = args.samples or n
    counts = tuple(int(c) for c in args.epochs.split(",")) if args.epochs else counts
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        config = write_config(Path(tmp) / "config.json")
        write_source(Path(tmp) / "warm", 100, 1)
        measure(Path(tmp) / "warm", config, 100, 1)  # the first plan imports and caches what every later one uses
        for epochs in counts:
            root = Path(tmp) / f"src{epochs}"
            write_source(root, n, epochs)
            rows.append(measure(root, config, n, epochs))
    slope = (rows[-1]["peak_mib"] - rows[0]["peak_mib"]) * 2**20 / (n * (counts[-1] - counts[0]))
    text = table(rows, ["epochs", "samples", "peak_mib", "seconds"])
    text += f"\n\npeak growth per sample and epoch: {slope:.2f} B"
    return emit("tinyvit_index", args, device("cpu"), {"rows": rows, "bytes_per_sample_epoch": slope}, text)


if __name__ == "__main__":
    main()
