"""gpu: both stages on one accelerator, each against its bare bound, in one JSON (issue 15).

- precompute views/s against bare teacher inference at the same precision (the teacher's forward on
  ready tensors): a torchvision ResNet-50 at 224 px on a generated folder of JPEGs with loader workers
  (decoding and rendering included), and at 32 px from memory (separating decoding from the teacher);
- training images/s of a ResNet-18 student from the cache, against the student alone (CE, live views)
  and against online KD (the teacher run on every batch);
- peak GPU memory of each phase, the share of a training step spent waiting for data (a loop over
  ``kdcache.loader`` timing ``next()`` apart from the step), and the host synchronisations per training
  step that ``torch.cuda.set_sync_debug_mode("warn")`` reports (evaluation included, one epoch).

Weights are random (nothing is downloaded): speed does not depend on them. ``--tiny`` shrinks every
size so the whole script runs on a CPU in seconds (tests/test_benchmarks.py runs it).

    python -m benchmarks.gpu [--tiny] [--precision auto|fp32|bf16|fp16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import device, emit, parse_args
from kdcache import data, loader, models
from kdcache.runtime import AUTOCAST, resolve_precision
from kdcache.student.config import TrainConfig
from kdcache.student.train import train
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

NAME = "gpu"
FULL = {"teacher": "torchvision:resnet50", "student": "torchvision:resnet18", "size": 224, "images": 2048,
        "classes": 100, "side": (256, 360), "memory_images": 8192, "views": 2, "batch": 256, "epochs": 1}
TINY = {"teacher": "torchvision:resnet18", "student": "cnn", "size": 48, "images": 24, "classes": 4,
        "side": (56, 72), "memory_images": 64, "views": 2, "batch": 8, "epochs": 1}


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: runs on a CPU in seconds (for the test)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: kdcache's)")


def jpeg_folder(root: Path, images: int, classes: int, side: tuple[int, int]) -> str:
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(images // 8, classes))):
        for i in range(count):
            folder = root / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(*side, size=2))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=85)
    return f"imagefolder:{root}"


def weights(root: Path, spec: str, classes: int) -> str:
    torch.manual_seed(0)
    path = root / (spec.replace(":", "_") + f"_{classes}.pt")
    torch.save(models.create_model(spec, classes, 3).state_dict(), path)
    return str(path)


def bare(spec: str, classes: int, size: int, batch: int, views: int, dev: torch.device, precision: str) -> float:
    """Views/s of the teacher's forward alone on ready tensors on the device, at ``precision``."""
    net = models.create_model(spec, classes, 3).to(dev).eval()
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=dev)
    dtype = AUTOCAST[precision]
    steps = max(1, views // batch)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        net(x)  # warm-up
        _sync(dev)
        began = time.perf_counter()
        for _ in range(steps):
            net(x).float()
        _sync(dev)
    return steps * batch / (time.perf_counter() - began)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    return int(peak)


def precompute_phase(s: dict[str, Any], dataset: str, teacher_weights: str, out: Path, dev: torch.device,
                     precision: str, size: int, workers: int | None) -> dict[str, Any]:
    n = len(data.open_source(dataset).train)
    result = precompute(PrecomputeConfig(dataset=dataset, teacher=s["teacher"], weights=teacher_weights, out=str(out),
                                         views=s["views"], teacher_size=size, batch_size=s["batch"], device=str(dev),
                                         precision=precision, workers=workers, progress=False))
    alone = bare(s["teacher"], s["classes"], size, s["batch"], n * s["views"], dev, precision)
    return {"cache": result.path, "views_per_s": result.views_per_second, "bare_views_per_s": alone,
            "ratio": result.views_per_second / alone, "peak_bytes": _peak(dev)}


def train_phase(s: dict[str, Any], dataset: str, cache: str, teacher_weights: str, out: Path, dev: torch.device,
                workers: int | None) -> dict[str, Any]:
    common = dict(dataset=dataset, model=s["student"], epochs=s["epochs"], batch_size=s["batch"], device=str(dev),
                  workers=workers, progress=False, size=s["size"])
    rates: dict[str, Any] = {}
    for name, extra in (("from_cache", {"cache": cache, "loss": "kd"}), ("alone", {"loss": "ce"}),
                        ("online_kd", {"online_teacher": s["teacher"], "teacher_weights": teacher_weights,
                                       "loss": "kd"})):
        result = train(TrainConfig(out=str(out / name), **common, **extra))
        rates[name] = {"images_per_s": result.final["images_per_s"], "peak_bytes": _peak(dev)}
    rates["host_syncs_per_step"] = sync_count(s, dataset, cache, out / "syncs", dev, workers)
    rates["cached_vs_alone"] = rates["from_cache"]["images_per_s"] / rates["alone"]["images_per_s"]
    rates["online_vs_cached"] = rates["online_kd"]["images_per_s"] / rates["from_cache"]["images_per_s"]
    return rates


def sync_count(s: dict[str, Any], dataset: str, cache: str, out: Path, dev: torch.device,
               workers: int | None) -> float | None:
    """Host synchronisations per training step from the cache, counted by CUDA's sync debug mode (one
    warning each); None on a CPU, which has nothing to synchronise with."""
    if dev.type != "cuda":
        return None
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(TrainConfig(dataset=dataset, model=s["student"], out=str(out), cache=cache, loss="kd",
                                       epochs=1, batch_size=s["batch"], device=str(dev), workers=workers,
                                       progress=False, size=s["size"]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    steps = max(1, round(result.final["seconds"] * result.final["images_per_s"] / s["batch"]))
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def data_wait(s: dict[str, Any], dataset: str, cache: str, dev: torch.device, workers: int | None) -> float:
    """Share of a KD step (on the public loader) spent waiting for the next batch."""
    net = models.create_model(s["student"], s["classes"], 3).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    stream = loader(cache, dataset, size=s["size"], batch_size=s["batch"], workers=workers or 0,
                    pin_memory=dev.type == "cuda")
    waited = total = 0.0
    began = time.perf_counter()
    for batch in stream:
        got = time.perf_counter()
        waited += got - began
        x = batch["input"].to(dev, non_blocking=True)
        target = batch["teacher"]["logits"].to(dev, non_blocking=True).softmax(dim=1)
        loss = -(target * net(x).log_softmax(dim=1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev)
        total += time.perf_counter() - began
        began = time.perf_counter()
    return waited / total if total else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv, options)
    dev = device(args.device)
    s = TINY if args.tiny else FULL
    precision = resolve_precision(args.precision, dev)
    with tempfile.TemporaryDirectory(prefix="kdcache-gpu-") as tmp:
        root = Path(tmp)
        folder = jpeg_folder(root / "jpegs", s["images"], s["classes"], s["side"])
        memory = f"fake:{s['memory_images']}:{s['classes']}:32"
        teacher = weights(root, s["teacher"], s["classes"])
        jpeg = precompute_phase(s, folder, teacher, root / "c224", dev, precision, s["size"], args.workers)
        small = precompute_phase(s, memory, teacher, root / "c32", dev, precision, 32, args.workers)
        training = train_phase(s, folder, jpeg["cache"], teacher, root / "runs", dev, args.workers)
        wait = data_wait(s, folder, jpeg["cache"], dev, args.workers)
    jpeg.pop("cache"), small.pop("cache")  # their folder is gone with the temporary directory
    result = {"tiny": args.tiny, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
              "precision": precision,
              "precompute_jpeg": jpeg, "precompute_memory_32px": small, "training": training,
              "data_wait_share": wait}
    text = (f"gpu benchmark on {dev} at {precision}: precompute {jpeg['ratio']:.2f}x bare inference (JPEG "
            f"{s['size']} px), {small['ratio']:.2f}x (32 px from memory); cached training "
            f"{training['cached_vs_alone']:.2f}x the student alone, online KD {training['online_vs_cached']:.2f}x "
            f"cached; data wait {100 * wait:.0f}% of a step")
    return emit(NAME, args, dev, result, text)


if __name__ == "__main__":
    main()
