"""Decoupled KD: target-class (binary) and non-target-class KL, weighted separately."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.errors import InvalidSpec
from kdcache.losses.base import (
    Batch,
    Loss,
    StudentOutput,
    TeacherBatch,
    cross_entropy,
    kl_rows,
    softmax_rows,
    teacher_scores,
)
from kdcache.losses.registry import register


def warmup_factor(epoch: int, warmup: int) -> float:
    """``min(epoch/warmup, 1)`` with epochs counted from 1, as in mdistiller (epoch is 0-based)."""
    return 1.0 if warmup <= 0 else min((epoch + 1) / warmup, 1.0)


def dkd_terms(
    zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, T: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD [B] at temperature T (a float or [B,1]), without the T² factor."""
    target = F.one_hot(labels, zs.shape[1]).bool()
    log_ps, log_pt = F.log_softmax(zs / T, dim=1), F.log_softmax(zt / T, dim=1)

    def binary(log_p: torch.Tensor) -> torch.Tensor:
        log_rest = torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=1)
        return torch.stack([log_p[target], log_rest], dim=1)

    tckd = kl_rows(binary(log_pt).exp(), binary(log_ps))
    rows, classes = zs.shape
    zs_other = zs[~target].view(rows, classes - 1)
    zt_other = zt[~target].view(rows, classes - 1)
    nckd = kl_rows(softmax_rows(zt_other, T), F.log_softmax(zs_other / T, dim=1))
    return tckd, nckd


@register
class DKD(Loss):
    """``L = ce_weight·CE + min(epoch/warmup, 1)·(alpha·TCKD + beta·NCKD)``, both ×T²."""

    name = "dkd"
    needs = frozenset({"probs"})
    scope = "sample"
    source = "Zhao et al., arXiv 2203.08679"
    sparse = (
        "approximate: log p stands in for zt (equal up to a per-row constant); the tail is uniform (top-k) or"
        " zero (sampled); a view with no non-target mass has NCKD 0"
    )
    defaults = {"T": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20, "ce_weight": 1.0}
    positive = ("T",)
    T: float
    alpha: float
    beta: float
    warmup: int
    ce_weight: float

    def __init__(self, **hparams: float) -> None:
        super().__init__(**hparams)
        if self.warmup < 0:
            raise InvalidSpec(f"loss {self.name}: warmup={self.warmup} must be >= 0 — e.g. 20")

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        tckd, nckd = dkd_terms(zs, zt, batch.labels, self.T)
        scale = warmup_factor(batch.epoch, self.warmup) * self.T**2
        tc = scale * self.alpha * tckd.mean()
        nc = scale * self.beta * nckd.mean()
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + tc + nc, {"ce": ce.detach(), "tckd": tc.detach(), "nckd": nc.detach()}
