"""Where the images live, measured side by side: an image folder, WebDataset shards on local disk and
on S3 (SeaweedFS on loopback), and a Hugging Face dataset, all holding one generated ImageNet-shaped set
(non-square JPEGs of 200-500 px); and JPEG decode at full versus reduced size.

    python -m benchmarks.data_sources            # 10,000 images, 3 interleaved repetitions
    python -m benchmarks.data_sources --quick    # 1,200 images, 2 repetitions

Per source: views/s of ``kdcache precompute`` (K=1, a cheap ``cnn`` teacher at 64 px, so the data path
is what is measured; its own process, its reported rate) and of ``kdcache.loader`` reading that cache
back as a student does (one epoch). Decode: images/s on one thread of the >= 400 px sources decoded
whole and resized to 128 px, full versus ``--decode reduced``. Targets (docs/benchmarks.md §8): shards
on local disk >= 1.0x the folder, S3 >= 0.9x local, reduced decode >= 2x full.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Run, device, emit, interleave_runs, median, parse_args, ratios, table

TEACHER_SIZE = 64
DECODE_SIZE = 128


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` train and ``n // 10`` val JPEGs (quality 90) of smooth noise, sides 200-500 px, in class folders."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(n // 10, classes))):
        for i in range(count):
            h, w = (int(v) for v in rng.integers(200, 501, size=2))
            small = rng.integers(0, 256, size=(max(h // 16, 1), max(w // 16, 1), 3)).astype(np.uint8)
            image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
            noise = rng.integers(-12, 13, size=(h, w, 3))
            pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def make_hf(folder: Path, out: Path) -> Path:
    """The folder as a Hugging Face DatasetDict (images stored as their JPEG bytes), saved to ``out``."""
    import datasets

    def split(name: str) -> Any:
        files = sorted((folder / name).glob("*/*.jpg"))
        rows = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                "label": [int(f.parent.name[1:]) for f in files]}
        features = datasets.Features({"image": datasets.Image(decode=False),
                                      "label": datasets.ClassLabel(names=[f"c{k}" for k in range(10)])})
        return datasets.Dataset.from_dict(rows, features=features).cast_column("image", datasets.Image())

    datasets.DatasetDict({"train": split("train"), "validation": split("val")}).save_to_disk(str(out))
    return out


def precompute(spec: str, weights: str, out: Path, decode: str = "full") -> Run:
    """One ``kdcache precompute`` in its own process: (views, seconds) as it reports them."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "kdcache", "precompute", "--dataset", spec, "--teacher", "cnn", "--weights", weights,
           "--out", str(out), "--views", "1", "--augment", "rrc+flip", "--teacher-size", str(TEACHER_SIZE),
           "--batch-size", "256", "--device", "cpu", "--decode", decode, "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    found = re.search(r"(\d+) views in ([\d.]+) s", done.stdout)
    return Run(int(found.group(1)), float(found.group(2)))


def read_epoch(cache: str, spec: str) -> Run:
    """One epoch of ``kdcache.loader`` over ``cache``: the student's data path (views rendered at 64 px)."""
    from kdcache import loader

    began, views = time.perf_counter(), 0
    for batch in loader(cache, spec, batch_size=256):
        views += len(batch["label"])
    return Run(views, time.perf_counter() - began)


def decode_rates(folder: Path, reps: int) -> dict[str, Any]:
    """Images/s on one thread: the >= 400 px JPEGs decoded whole and resized to 128 px: full (Pillow),
    kdcache's reduced decode (simplejpeg at M/8), and Pillow's draft (powers of two) for reference."""
    from torchvision.transforms.v2 import functional as F

    from kdcache.data.decode import decode_bytes, decode_image
    from kdcache.views import reduction

    files = [f for f in sorted((folder / "train").glob("*/*.jpg")) if min(Image.open(f).size) >= 400][:400]
    blobs = [f.read_bytes() for f in files]
    whole = (0.0, 0.0, 1.0, 1.0)
    torch.set_num_threads(1)

    def draft(blob: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(blob))
        w, h = image.size
        r = next((r for r in (8, 4, 2) if min(w, h) / r >= DECODE_SIZE), 1)
        image.draft("RGB", (-(-w // r), -(-h // r)))
        return decode_image(image, "RGB")

    decoders = {
        "full": lambda blob: decode_image(Image.open(io.BytesIO(blob)), "RGB"),
        "reduced": lambda blob: decode_bytes(blob, "RGB", lambda w, h: reduction(w, h, whole, DECODE_SIZE)),
        "pillow draft": draft,
    }

    def run(decoder) -> Run:
        began = time.perf_counter()
        for blob in blobs:
            F.resize(decoder(blob), [DECODE_SIZE, DECODE_SIZE], antialias=True)
        return Run(len(blobs), time.perf_counter() - began)

    runs = interleave_runs({name: (lambda d=d: run(d)) for name, d in decoders.items()}, reps)
    return {"images": len(blobs), **{f"{name.replace(' ', '_')}_per_s": median(r.rate for r in runs[name])
                                     for name in decoders},
            **ratios(runs["reduced"], runs["full"]),
            "pillow_draft_ratio": ratios(runs["pillow draft"], runs["full"])["ratio"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, lambda p: p.add_argument(
        "--images", type=int, default=None, help="train images (default 10,000; 1,200 with --quick)"))
    reps = min(args.reps, 2 if args.quick else 3)  # each precompute decodes every image: keep the run short
    n = args.images or (1200 if args.quick else 10_000)
    root = Path(tempfile.mkdtemp(prefix="kdcache-sources-"))
    environment = dict(os.environ)  # the S3 server's credentials and the index folder are this run's only
    os.environ["KDCACHE_INDEX_DIR"] = str(root / "index")  # the shards' indices go with the run (kdcache/data/wds_index.py)
    server = None
    try:
        began = time.perf_counter()
        folder = make_folder(root / "folder", n)
        from kdcache import models
        from kdcache.data import open_source
        from kdcache.data.wds_writer import write_shards

        write_shards(open_source(f"imagefolder:{folder}"), str(root / "shards"), per_shard=1000)
        shards = len(list((root / "shards").glob("train-*.tar")))
        pattern = f"train-{{000000..{shards - 1:06d}}}.tar"
        specs = {"folder": f"imagefolder:{folder}", "wds local": f"wds:{root / 'shards'}/{pattern}"}
        from benchmarks.sharing import start_seaweedfs

        server, url = start_seaweedfs(root / "seaweedfs")
        if server is not None:
            import fsspec

            fs, prefix = fsspec.core.url_to_fs(url)
            for tar in sorted((root / "shards").glob("*.tar")):
                fs.put_file(str(tar), f"{prefix}/{tar.name}")
            specs["wds S3"] = f"wds:{url}/{pattern}"
        try:
            specs["hfds"] = f"hfds:{make_hf(folder, root / 'hf')}"
        except ImportError:
            print("  (no datasets package: pip install 'kdcache[hfds]' to measure hfds:)")
        prepared = time.perf_counter() - began
        torch.manual_seed(0)
        weights = str(root / "cnn.pt")
        torch.save(models.create_model("cnn", 10, 3).state_dict(), weights)

        variants = {name: (lambda spec=spec, name=name: precompute(spec, weights, root / "caches" / name))
                    for name, spec in specs.items()}
        variants["folder, reduced decode"] = lambda: precompute(specs["folder"], weights, root / "caches" / "reduced",
                                                               "reduced")
        pre_runs = interleave_runs(variants, reps)
        caches = {name: str(next(p for p in (root / "caches" / name).iterdir() if p.is_dir())) for name in specs}
        load_runs = interleave_runs({name: (lambda name=name: read_epoch(caches[name], specs[name]))
                                     for name in specs}, reps)
        decode = decode_rates(folder, max(reps, 3))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
        os.environ.clear()
        os.environ.update(environment)
        if "s3fs" in sys.modules:  # fsspec keeps file systems per options, not per endpoint: forget this one's
            sys.modules["s3fs"].S3FileSystem.clear_instance_cache()

    rows = []
    for name in variants:
        row = {"source": name, "precompute views/s": median(r.rate for r in pre_runs[name]),
               "vs folder": ratios(pre_runs[name], pre_runs["folder"])["ratio"]}
        if name in load_runs:
            row |= {"loader views/s": median(r.rate for r in load_runs[name]),
                    "loader vs folder": ratios(load_runs[name], load_runs["folder"])["ratio"]}
        rows.append(row)
    targets = {"wds local / folder (precompute)": rows[1]["vs folder"]}
    if "wds S3" in pre_runs:
        targets["S3 / local (precompute)"] = ratios(pre_runs["wds S3"], pre_runs["wds local"])["ratio"]
        targets["S3 / local (loader)"] = ratios(load_runs["wds S3"], load_runs["wds local"])["ratio"]
    targets["reduced / full decode"] = decode["ratio"]
    text = (f"{n:,} train JPEGs (200-500 px) in {shards} shards, prepared in {prepared:.0f} s; {reps} interleaved "
            f"repetitions\n\n" + table(rows, ["source", "precompute views/s", "vs folder", "loader views/s",
                                              "loader vs folder"])
            + f"\n\ndecode of {decode['images']} >= 400 px JPEGs to {DECODE_SIZE} px, one thread: full "
            f"{decode['full_per_s']:.0f}/s, reduced {decode['reduced_per_s']:.0f}/s ({decode['ratio']:.2f}x), "
            f"Pillow draft {decode['pillow_draft_per_s']:.0f}/s ({decode['pillow_draft_ratio']:.2f}x)\n"
            + "\n".join(f"{k}: {v:.2f}" for k, v in targets.items()))
    return emit("data_sources", args, device("cpu"), {"images": n, "shards": shards, "rows": rows, "decode": decode,
                                                      "targets": targets}, text)


if __name__ == "__main__":
    main()
