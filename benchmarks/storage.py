"""storage: stored bytes per view of every logit mode, feature mode and codec, and codec decode speed.

10 classes are the real outputs of a `cnn` teacher trained on mnist5k, cached by the real
:func:`kdcache.teacher.precompute.precompute` (float32 logits and full feature maps). 100 and 1000 classes are
synthetic logits from a distribution fitted to that teacher: per view ``z = s·N(0, I_C)`` plus a margin
on one random class chosen so that the top-1 probability equals ``p``, with ``(p, s)`` resampled from
the real teacher's views (``p`` its top-1 probability, ``s`` the std of its other logits): the
synthetic teacher is exactly as confident as the real one. Every mode is derived from those float32
logits by the library's own code (:func:`kdcache.teacher.outputs.teacher_targets`, ``reduce_feature``) and
written as a Zarr v3 array chunked as a cache chunks it (``[S, 1, ...]``), with each codec followed by
crc32c. Bytes are the chunk bytes only (no metadata).

    python -m benchmarks.storage [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np
import torch
import zarr
import zarr.storage
from zarr.core.sync import sync as zsync

from benchmarks.common import device, emit, median, parse_args, table
from kdcache.cache.arrays import ArraySpec, compressors, default_chunk_samples
from kdcache.cache.store import open_cache
from kdcache.student.config import TrainConfig
from kdcache.student.train import train
from kdcache.teacher.config import PrecomputeConfig
from kdcache.cache.logits import parse_logits, target_specs
from kdcache.teacher.outputs import class_uniforms, host_arrays, reduce_feature, teacher_targets
from kdcache.teacher.precompute import precompute

NAME = "storage"
# blosc's clevel L runs zstd at level 2L-1 (L < 9) or 22 (L = 9); zstd:L is plain zstd without shuffle
CODECS = ["blosc-zstd:1", "blosc-zstd:3", "blosc-zstd:5", "blosc-zstd:9", "blosc-lz4:5", "zstd:1", "zstd:3", "none:0"]
LOGIT_MODES = [("dense", "float16"), ("dense", "bfloat16"), ("dense", "float32"),
               ("topk:5", "float16"), ("topk:10", "float16"), ("sampled:50", "float16")]
FEATURE_LAYERS = ("layer1", "layer2")


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000], help="class counts")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="epochs of the cnn teacher (3; 1 quick)")
    parser.add_argument("--samples", type=int, default=None, help="samples measured (all 4000; 500 quick)")


def real_teacher(folder: str, quick: bool, epochs: int | None) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Float32 logits [N, K, 10] and full feature maps of a trained cnn, through the real precompute."""
    epochs = epochs or (1 if quick else 3)
    train(TrainConfig(dataset="mnist5k", model="cnn", out=f"{folder}/teacher", epochs=epochs, progress=False))
    views = 2 if quick else 4
    result = precompute(PrecomputeConfig(
        dataset="mnist5k", teacher="cnn", weights=f"{folder}/teacher/model.pt", out=f"{folder}/caches",
        views=views, logit_dtype="float32", features=tuple(f"{layer}:full" for layer in FEATURE_LAYERS),
        progress=False))
    cache = open_cache(result.path)
    n = cache.num_samples
    arrays = {name: cache.read_samples(name, 0, n) for name in cache.array_names}
    return arrays.pop("logits"), arrays, cache.manifest


def fitted_logits(real: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """Synthetic logits [N, K, classes], as confident as the real teacher's views (see the module doc)."""
    flat = np.sort(real.reshape(-1, real.shape[-1]).astype(np.float64), axis=1)
    top1 = np.clip(torch.softmax(torch.from_numpy(flat), dim=1)[:, -1].numpy(), 1e-6, 1 - 1e-6)
    spread = flat[:, :-1].std(1)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(flat), len(flat))
    z = rng.standard_normal((len(flat), classes)) * spread[pick, None]
    rows, winner = np.arange(len(flat)), rng.integers(0, classes, len(flat))
    z[rows, winner] = -np.inf
    others = np.logaddexp.reduce(z, axis=1)
    p = top1[pick]
    z[rows, winner] = np.log(p / (1 - p)) + others  # softmax(z)[winner] == p exactly
    return z.astype(np.float32).reshape(*real.shape[:2], classes)


def targets(logits: np.ndarray, mode: str, dtype: str) -> dict[str, tuple[np.ndarray, ArraySpec]]:
    """The arrays a cache stores for ``logits`` [N, K, C] in logit mode ``mode``."""
    n, k, c = logits.shape
    entry = parse_logits(mode, c, dtype)
    flat = torch.from_numpy(logits.reshape(-1, c))
    index = np.repeat(np.arange(n), k)
    view = np.tile(np.arange(k), n)
    parts: list[dict[str, np.ndarray]] = []
    for lo in range(0, len(flat), 4096):
        hi = lo + 4096
        uniforms = (torch.from_numpy(class_uniforms(0, index[lo:hi], view[lo:hi], entry["draws"]))
                    if entry["mode"] == "sampled" else None)
        parts.append(host_arrays(teacher_targets(flat[lo:hi], entry, uniforms), {"logits": entry}))
    specs = {s.name: s for s in target_specs(entry, c)}
    return {name: (np.concatenate([p[name] for p in parts]).reshape(n, k, -1), specs[name]) for name in specs}


def features(maps: np.ndarray, mode: str) -> np.ndarray:
    """A layer's stored array in ``mode``, from its full float16 maps [N, K, C, H, W]."""
    n, k = maps.shape[:2]
    out = [reduce_feature(torch.from_numpy(maps[i:i + 512].reshape(-1, *maps.shape[2:]).astype(np.float32)), mode)
           for i in range(0, n, 512)]
    return torch.cat(out).numpy().reshape(n, k, *out[0].shape[1:])


def write(values: np.ndarray, dtype: str, codec: str) -> tuple[zarr.Array, int, float]:
    """``values`` [N, K, ...] as a cache array with ``codec``: (array, chunk bytes, encode seconds)."""
    name, level = codec.split(":")
    spec = ArraySpec("x", values.shape[2:], dtype)
    chunk = min(default_chunk_samples([spec]), values.shape[0])
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    arr = group.create_array("x", shape=values.shape, dtype=dtype, chunks=(chunk, 1, *values.shape[2:]),
                             compressors=compressors(dtype, name, int(level)), fill_value=0)
    began = time.perf_counter()
    arr[:] = values
    seconds = time.perf_counter() - began
    return arr, int(zsync(group.store.getsize_prefix("x/c/"))), seconds


def decode_seconds(arr: zarr.Array) -> float:
    """Seconds to read the array the way training does: chunk blocks of one view."""
    chunk = arr.chunks[0]
    began = time.perf_counter()
    for v in range(arr.shape[1]):
        for start in range(0, arr.shape[0], chunk):
            arr[start : start + chunk, v]
    return time.perf_counter() - began


def measure(label: str, classes: int | None, arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, Any]:
    """Bytes per view of one stored output (possibly several arrays) under every codec."""
    views = next(iter(arrays.values()))[0].shape[:2]
    per_view = views[0] * views[1]
    raw = sum(values.nbytes for values, _ in arrays.values())
    row: dict[str, Any] = {"output": label, "classes": classes, "raw B/view": raw / per_view}
    for codec in CODECS:
        row[codec] = sum(write(values, dtype, codec)[1] for values, dtype in arrays.values()) / per_view
    return row


def speed(samples: dict[str, np.ndarray], reps: int) -> list[dict[str, Any]]:
    """Encode and decode MB/s (of raw bytes) of every codec on float16 arrays, median of ``reps`` runs."""
    rows = []
    for codec in CODECS:
        if codec == "blosc-zstd:9":
            continue  # zstd level 22: encodes at a few MB/s, out of the question for a precompute hot loop
        row: dict[str, Any] = {"codec": codec}
        for label, values in samples.items():
            runs = [write(values, "float16", codec) for _ in range(reps)]
            row[f"{label} encode MB/s"] = values.nbytes / median(r[2] for r in runs) / 1e6
            row[f"{label} decode MB/s"] = values.nbytes / median(decode_seconds(runs[0][0]) for _ in range(reps)) / 1e6
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, options)
    dev = device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        real, others, manifest = real_teacher(folder, args.quick, args.teacher_epochs)
    keep = args.samples or (500 if args.quick else len(real))
    real, others = real[:keep], {name: values[:keep] for name, values in others.items()}
    n, k = real.shape[:2]
    rows, distinct, largest = [], {}, {}
    for classes in args.classes:
        logits = real if classes == real.shape[-1] else fitted_logits(real, classes)
        for mode, dtype in LOGIT_MODES:
            if mode.startswith("topk") and int(mode.split(":")[1]) > classes:
                continue
            stored = targets(logits, mode, dtype)
            label = mode if mode.startswith("sampled") else f"{mode}/{dtype}"
            rows.append(measure(label, classes, {name: (v, spec.dtype) for name, (v, spec) in stored.items()}))
            if mode == "sampled:50":
                distinct[classes] = float((stored["sampled/counts"][0] > 0).sum(-1).mean())
            if mode == "dense" and dtype == "float16":
                largest["logits"] = stored["logits"][0]
    for layer in FEATURE_LAYERS:
        maps = others[f"features/{layer}"]
        for mode in ("full", "pooled", "attention"):
            values = maps if mode == "full" else features(maps, mode)
            rows.append(measure(f"features {layer}:{mode} [{'x'.join(map(str, values.shape[2:]))}]", None,
                                {"f": (values, "float16")}))
    largest["features"] = others[f"features/{FEATURE_LAYERS[0]}"]
    rows.append(measure("energy (T=1,4)", None, {"e": (others["energy"], "float32")}))
    aug = {name: (v, str(v.dtype)) for name, v in others.items() if name.startswith("aug/")}
    rows.append(measure("aug rrc+flip", None, aug))
    speeds = speed(largest, args.reps)
    text = "\n\n".join([
        f"stored bytes per view, {n} samples x {k} views (10 classes: a trained cnn on mnist5k; "
        "100/1000: synthetic logits fitted to it)",
        table(rows, ["output", "classes", "raw B/view", *CODECS]),
        f"codec speed, MB/s of raw bytes, one thread of a shared machine: logits = dense float16 "
        f"[{'x'.join(map(str, largest['logits'].shape[2:]))}], features = full float16 "
        f"[{'x'.join(map(str, largest['features'].shape[2:]))}]",
        table(speeds, list(speeds[0])),
        "distinct class ids per view of sampled:50: " + ", ".join(f"{c} classes {d:.1f}" for c, d in distinct.items()),
    ])
    result = {"samples": n, "views": k, "codecs": CODECS, "rows": rows, "speed": speeds,
              "sampled_distinct_ids": {str(c): d for c, d in distinct.items()},
              "teacher": {"spec": "cnn", "dataset": "mnist5k", "fingerprint": manifest["dataset"]["fingerprint"]}}
    return emit(NAME, args, dev, result, text)


if __name__ == "__main__":
    main()
