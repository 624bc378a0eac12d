"""One training epoch: every batch of the run's stream through the student, the loss against the
teacher's outputs (cached, online or none), one optimizer step each, with the epoch's sums kept on
the device (:class:`RunningSums`) and read back every ``LOG_EVERY`` steps on an accelerator.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdcache import distributed, losses
from kdcache.errors import TrainingDiverged
from kdcache.runtime import AUTOCAST, prefetched
from kdcache.student.online import OnlineTeacher
from kdcache.student.setup import Run
from kdcache.student.targets import CacheTargets

LOG_EVERY = 25  # steps between reads of the running sums on an accelerator (progress bar, non-finite check)


def train_one_epoch(run: Run, epoch: int) -> tuple[RunningSums, float]:
    """Train ``run``'s student for one epoch; returns the epoch's sums and its seconds."""
    cfg, device = run.cfg, run.device
    run.stream.set_epoch(epoch)
    run.model.train()
    began = time.perf_counter()
    tally = RunningSums(device, every=1 if device.type == "cpu" else LOG_EVERY)
    batches = prefetched(run.loader) if run.workers == 0 else run.loader  # workers, if any, already run ahead
    bar = tqdm(batches, total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img",
               unit_scale=cfg.batch_size, disable=not cfg.progress or run.rank > 0, dynamic_ncols=True, leave=False)
    for batch in distributed.uneven(bar, run.net):
        total, terms, predicted, labels, reference = _forward(run, batch, epoch)
        tally.add(len(labels), total, terms, predicted, labels, reference)
        tally.check(epoch, run.checkpoint_path, bar)  # a non-finite loss stops before its step
        _step(run, total)
    tally.check(epoch, run.checkpoint_path, bar, force=True)
    return tally, time.perf_counter() - began


def _forward(run: Run, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict[str, Any],
                                                                          torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None]:
    """The loss of one batch: (total, named terms, predicted classes, labels, the teacher's reference)."""
    device, num_classes = run.device, run.source.num_classes
    inputs = batch["input"].to(device, non_blocking=True)
    if device.type == "cuda":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(device)
    info = losses.Batch(labels=labels, soft_labels=soft_labels(batch, num_classes, device), epoch=epoch,
                        mixed=(batch["lam"] < 1).to(device), label_smoothing=run.cfg.label_smoothing)
    autocast_dtype = AUTOCAST[run.precision]
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = run.step_net(inputs)
        teacher = teacher_batch(batch, inputs, run.online, run.targets, device)
    student = losses.StudentOutput(logits=logits.float(), features=run.tap.take() if run.tap else {})
    total, terms = run.criterion(student, teacher, info)
    reference = teacher.logits if teacher.logits is not None else teacher.probs
    return total, terms, logits.argmax(dim=1), labels, reference


def _step(run: Run, total: torch.Tensor) -> None:
    """Backward, optional clipping, the optimizer and schedule step, and the EMA update."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if run.cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)


def soft_labels(batch: dict[str, torch.Tensor], num_classes: int, device: torch.device) -> torch.Tensor | None:
    """The mixed batch's label distributions (λ own + (1-λ) partner), or None when nothing is mixed."""
    lam = batch["lam"].float()
    if bool((lam >= 1).all()):
        return None
    own = F.one_hot(batch["label"], num_classes).float()
    partner = F.one_hot(batch["partner_label"], num_classes).float()
    return (lam[:, None] * own + (1 - lam[:, None]) * partner).to(device)


def teacher_batch(batch: dict[str, torch.Tensor], inputs: torch.Tensor, online: OnlineTeacher | None,
                  targets: CacheTargets | None, device: torch.device) -> losses.TeacherBatch:
    """The teacher's outputs for this batch: run online, read from the cache, or none (plain CE)."""
    if online is not None:
        return losses.TeacherBatch(logits=online(inputs))
    if targets is not None:
        return targets(batch, device)
    return losses.TeacherBatch()


class RunningSums:
    """An epoch's running sums, kept on the device: read every ``every`` steps (the progress bar and the
    non-finite check) and once at the end, not once per step and term."""

    def __init__(self, device: torch.device, every: int) -> None:
        self.device, self.every = device, every
        self.seen, self.steps, self.checked = 0, 0, 0
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.agree = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, n: int, total: torch.Tensor, terms: dict[str, Any], predicted: torch.Tensor, labels: torch.Tensor,
            reference: torch.Tensor | None) -> None:
        self.seen += n
        self.steps += 1
        for name, value in {"loss": total, **terms}.items():
            value = torch.as_tensor(value, device=self.device).detach().to(torch.float64) * n
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.correct += predicted.eq(labels).sum()
        if reference is not None:
            self.agree += predicted.eq(reference.argmax(dim=1)).sum()

    def check(self, epoch: int, checkpoint: Path, bar: tqdm, force: bool = False) -> None:
        """Every ``every`` steps (and with ``force``): refuse a non-finite loss, naming the steps, and
        update the progress bar."""
        if not self.steps or (self.steps % self.every and not force) or self.checked == self.steps:
            return
        loss = float(self.sums["loss"]) / self.seen
        if not math.isfinite(loss):
            where = (f"step {self.steps}" if self.steps == self.checked + 1
                     else f"steps {self.checked + 1}–{self.steps}")
            kept = (f"{checkpoint} keeps the last good epoch (--resume continues from it)" if checkpoint.exists()
                    else "no epoch had finished, so nothing was kept")
            raise TrainingDiverged(f"the loss became {loss} at epoch {epoch + 1}, {where} — lower --lr or check "
                                   f"the loss parameters; {kept}")
        self.checked = self.steps
        bar.set_postfix(loss=f"{loss:.3f}")

    def totals(self) -> tuple[list[str], list[float]]:
        """(names of the sums, [seen, correct, agree, *sums]) as host numbers: one read."""
        names = list(self.sums)
        values = torch.stack([self.correct, self.agree, *self.sums.values()]).tolist()
        return names, [self.seen, *values]
