"""Stage 2: train a student from a cache (the teacher is never loaded), from an online teacher, or
alone with cross-entropy.

Read as torchvision's reference trainer reads: :func:`train` sets the run up
(kdcache/student/setup.py), then for each epoch trains it (kdcache/student/epoch.py), evaluates it
(:func:`evaluate_epoch`) and checkpoints it (kdcache/student/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from kdcache import distributed
from kdcache.student import checkpoint
from kdcache.student.config import TrainConfig, TrainSettings, resolve
from kdcache.student.epoch import RunningSums, train_one_epoch
from kdcache.student.evaluate import evaluate
from kdcache.student.setup import Run, check, set_up, student_views

__all__ = ["TrainResult", "check", "describe_views", "evaluate_epoch", "train"]


@dataclasses.dataclass
class TrainResult:
    out: str
    metrics: list[dict[str, Any]]
    model: torch.nn.Module = dataclasses.field(repr=False)

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}


def train(cfg: TrainConfig | TrainSettings, on_start: Callable[[Run], None] | None = None) -> TrainResult:
    """Run stage 2 as ``cfg`` says; writes model.pt, checkpoint.pt, metrics.jsonl, run.json to ``cfg.out``.
    ``on_start`` is called with the set-up run before the first step (the CLI says what the views are)."""
    settings = resolve(cfg)
    cfg = settings.config
    fresh = checkpoint.is_fresh(Path(cfg.out))
    run = set_up(settings)
    if on_start is not None:
        on_start(run)
    start_epoch, metrics = checkpoint.start(run)
    with checkpoint.discarded_on_failure(run.out, fresh and run.rank == 0):  # a run that never finished an epoch
        for epoch in range(start_epoch, cfg.epochs):
            tally, seconds = train_one_epoch(run, epoch)
            metrics.append(evaluate_epoch(run, epoch, tally, seconds))
            if run.rank == 0:
                checkpoint.save(run, epoch, metrics)
    return TrainResult(str(run.out), metrics, run.model)


def describe_views(run: Run) -> str | None:
    """One line on what the student renders of the cache's views and whether they are the teacher's (None
    without a cache)."""
    views = student_views(run.cfg, run.cache)
    return views.describe() if views is not None else None


def evaluate_epoch(run: Run, epoch: int, tally: RunningSums, seconds: float) -> dict[str, Any]:
    """The epoch's record for metrics.jsonl: every rank's training sums and the test split's metrics."""
    names, values = tally.totals()  # one read of the device sums per epoch
    seen, correct, agree, *totals = distributed.all_sum(values, run.device)
    sums = dict(zip(names, totals))  # every rank's views: the epoch's figures, whatever the number of ranks
    test = evaluate(run.model, run.test_loader, run.device)
    ema_test = evaluate(run.ema.module, run.test_loader, run.device) if run.ema is not None else {}
    return {
        "epoch": epoch + 1,
        **{name: value / seen for name, value in sums.items()},
        "train_top1": 100.0 * correct / seen,
        **({"teacher_agreement": 100.0 * agree / seen} if run.cache is not None or run.online else {}),
        "test_top1": test["top1"],
        "test_top5": test["top5"],
        "test_ece": test["ece"],
        "test_loss": test["loss"],
        **{f"ema_test_{name}": value for name, value in ema_test.items()},
        "lr": run.scheduler.get_last_lr()[0],
        "images_per_s": seen / seconds,
        "seconds": seconds,
    }
