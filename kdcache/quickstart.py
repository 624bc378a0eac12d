"""The built-in end-to-end demo: a teacher, its cache, and three students that show what the cache buys.

The students share recipe, seed and epochs: one alone (CE), one with the teacher run on every batch
(classic online KD), one reading the teacher from the cache (the same KD). The summary compares the
two KD students: what the cache saves in time and what it costs in accuracy.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache import checks, losses
from kdcache.data.spec import parse as parse_dataset
from kdcache.student.config import TrainConfig
from kdcache.student.online import check_online
from kdcache.student.train import train
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

_OWNED = ("teacher", "cache", "student-ce", "student-online-kd", "student-cached-kd")


@dataclass
class QuickstartConfig:
    out: str = "quickstart"
    dataset: str = "mnist5k"
    teacher: str = "resnet20"
    student: str = "resnet8"
    size: int = 16
    augment: str = "rrc:0.35"  # digits: milder crops than ImageNet's 0.08, and no flips
    teacher_epochs: int = 6
    student_epochs: int = 5
    views: int = 8  # more views than student epochs: no view is seen twice
    loss: str = "kd"
    batch_size: int = 128
    optimizer: str = "sgd"
    teacher_lr: float = 0.1
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0
    threads: int = 2  # torch's intra-op threads: the same arithmetic, so the same result, on any machine
    workers: int | None = None
    progress: bool = True

    def validate(self) -> None:
        """Refuse, in one line, values no stage could run with (before the teacher trains for minutes)."""
        parse_dataset(self.dataset)
        for option, value in (("--teacher-epochs", self.teacher_epochs), ("--epochs", self.student_epochs),
                              ("--views", self.views), ("--threads", self.threads), ("--size", self.size)):
            checks.at_least(option, value, 1)
        checks.seed(self.seed)
        checks.output_folder("--out", self.out)
        check_online(self.loss, type(losses.get(self.loss)).needs)


@dataclass
class Stage:
    name: str
    top1: float | None
    seconds: float


def run_quickstart(cfg: QuickstartConfig, log: Callable[[str], None] = print) -> list[Stage]:
    """Train a teacher, cache ``views`` views of its outputs, then the student alone, with the teacher
    online and from the cache; return each stage's test top-1 and wall time, in that order."""
    root = Path(cfg.out)
    for owned in _OWNED:  # a rerun starts afresh
        shutil.rmtree(root / owned, ignore_errors=True)
    stages: list[Stage] = []

    def timed(name: str, fn):
        log(f"[kdcache quickstart] {name} …")
        began = time.perf_counter()
        result = fn()
        stages.append(Stage(name, getattr(result, "final", {}).get("test_top1"), time.perf_counter() - began))
        return result

    common = dict(dataset=cfg.dataset, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                  weight_decay=cfg.weight_decay, seed=cfg.seed, size=cfg.size, augment=cfg.augment,
                  workers=cfg.workers, progress=cfg.progress)
    student = dict(model=cfg.student, epochs=cfg.student_epochs, lr=cfg.lr, **common)
    weights = str(root / "teacher" / "model.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        timed(f"teacher {cfg.teacher} (CE)", lambda: train(TrainConfig(
            model=cfg.teacher, out=str(root / "teacher"), epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, **common)))
        cache = timed(f"precompute {cfg.views} views", lambda: precompute(PrecomputeConfig(
            dataset=cfg.dataset, teacher=cfg.teacher, weights=weights, out=str(root / "cache"), views=cfg.views,
            seed=cfg.seed, augment=cfg.augment, teacher_size=cfg.size, batch_size=2 * cfg.batch_size,
            workers=cfg.workers, progress=cfg.progress)))
        timed(f"student {cfg.student} alone (CE)", lambda: train(TrainConfig(
            out=str(root / "student-ce"), loss="ce", **student)))
        timed(f"student {cfg.student}, teacher online ({cfg.loss})", lambda: train(TrainConfig(
            out=str(root / "student-online-kd"), loss=cfg.loss, online_teacher=cfg.teacher,
            teacher_weights=weights, **student)))
        timed(f"student {cfg.student} from the cache ({cfg.loss})", lambda: train(TrainConfig(
            out=str(root / "student-cached-kd"), cache=cache.path, loss=cfg.loss, **student)))
    finally:
        torch.set_num_threads(threads)
    return stages


def table(stages: list[Stage]) -> str:
    """The stages as a markdown table."""
    lines = ["| stage | test top-1 (%) | wall time (s) |", "|---|---:|---:|"]
    for stage in stages:
        top1 = "—" if stage.top1 is None else f"{stage.top1:.2f}"
        lines.append(f"| {stage.name} | {top1} | {stage.seconds:.0f} |")
    return "\n".join(lines)


def summary(stages: list[Stage]) -> str:
    """One line on what the cache buys: online-KD time ÷ cached time, the accuracy gaps, and after how
    many students the precompute has paid for itself."""
    by_role = dict(zip(("teacher", "precompute", "alone", "online", "cached"), stages, strict=True))
    online, cached, alone = by_role["online"], by_role["cached"], by_role["alone"]
    line = (f"cost ratio (online KD time ÷ cached time): {online.seconds / cached.seconds:.2f}×; "
            f"accuracy gap cached − online: {cached.top1 - online.top1:+.2f} pp; "
            f"cached − alone: {cached.top1 - alone.top1:+.2f} pp")
    saved = online.seconds - cached.seconds
    if saved > 0:
        line += f"; the precompute pays for itself after {by_role['precompute'].seconds / saved:.1f} students"
    return line
