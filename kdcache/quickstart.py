"""The built-in end-to-end demo: teacher → cache → student alone vs. student from the cache."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kdcache.student.config import TrainConfig
from kdcache.student.train import train
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute


@dataclass
class QuickstartConfig:
    out: str = "quickstart"
    dataset: str = "mnist5k"
    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    size: int = 12
    augment: str = "rrc:0.35"  # digits: milder crops than ImageNet's 0.08, and no flips
    teacher_epochs: int = 4
    student_epochs: int = 2
    views: int = 8
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    workers: int | None = None
    progress: bool = True


@dataclass
class Stage:
    name: str
    top1: float | None
    seconds: float


def run_quickstart(cfg: QuickstartConfig, log=print) -> list[Stage]:
    """Train a teacher, cache 8 views of its outputs, then train the student alone and from the cache
    with the same epochs, seed and views; return each stage's test top-1 and wall time."""
    root = Path(cfg.out)
    for owned in ("teacher", "cache", "student-ce", "student-kd"):  # a rerun starts afresh
        shutil.rmtree(root / owned, ignore_errors=True)
    stages: list[Stage] = []

    def timed(name: str, fn):
        log(f"[kdcache quickstart] {name} …")
        began = time.perf_counter()
        result = fn()
        stages.append(Stage(name, getattr(result, "final", {}).get("test_top1"), time.perf_counter() - began))
        return result

    common = dict(dataset=cfg.dataset, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                  weight_decay=cfg.weight_decay, seed=cfg.seed, size=cfg.size, augment=cfg.augment,
                  workers=cfg.workers, progress=cfg.progress)
    timed(f"teacher {cfg.teacher} (CE)", lambda: train(TrainConfig(
        model=cfg.teacher, out=str(root / "teacher"), epochs=cfg.teacher_epochs, **common)))
    cache = timed(f"precompute {cfg.views} views", lambda: precompute(PrecomputeConfig(
        dataset=cfg.dataset, teacher=cfg.teacher, weights=str(root / "teacher" / "model.pt"),
        out=str(root / "cache"), views=cfg.views, seed=cfg.seed, augment=cfg.augment, teacher_size=cfg.size,
        batch_size=2 * cfg.batch_size, workers=cfg.workers, progress=cfg.progress)))
    timed(f"student {cfg.student} alone (CE)", lambda: train(TrainConfig(
        model=cfg.student, out=str(root / "student-ce"), epochs=cfg.student_epochs, **common)))
    timed(f"student {cfg.student} from cache (KD)", lambda: train(TrainConfig(
        model=cfg.student, out=str(root / "student-kd"), cache=cache.path, loss="kd",
        epochs=cfg.student_epochs, **common)))
    return stages


def table(stages: list[Stage]) -> str:
    """The stages as a markdown table."""
    lines = ["| stage | test top-1 (%) | wall time (s) |", "|---|---:|---:|"]
    for stage in stages:
        top1 = "—" if stage.top1 is None else f"{stage.top1:.2f}"
        lines.append(f"| {stage.name} | {top1} | {stage.seconds:.0f} |")
    return "\n".join(lines)
