"""DIST: Pearson correlation between student and teacher probabilities, per sample and per class.

Batch-level through the per-class (intra) term; results depend on the per-device batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.losses.base import (
    Batch,
    Loss,
    StudentOutput,
    TeacherBatch,
    cross_entropy,
    mean_over,
    softmax_rows,
    teacher_scores,
)
from kdcache.losses.registry import register


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` [rows]."""
    return F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1)


@register
class DIST(Loss):
    """``L = ce_weight·CE + T²·(beta·L_inter + gamma·L_intra)``; beta = gamma = 2 is 2·τ²."""

    name = "dist"
    needs = frozenset({"probs"})
    scope = "batch"
    source = "Huang et al., arXiv 2205.10536"
    sparse = (
        "approximate: softmax(zt/T) is p^(1/T) renormalised; the tail is uniform (top-k) or zero (sampled); "
        "the per-class mean skips classes without spread in the batch"
    )
    defaults = {"T": 4.0, "beta": 2.0, "gamma": 2.0, "ce_weight": 1.0}
    positive = ("T",)
    T: float
    beta: float
    gamma: float
    ce_weight: float

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        ps, pt = F.softmax(zs / self.T, dim=1), softmax_rows(zt, self.T)
        inter = self.beta * self.T**2 * (1 - pearson_rows(ps, pt).mean())
        varies = (pt - pt.mean(0)).abs().amax(0) > 0
        intra = self.gamma * self.T**2 * (1 - mean_over(pearson_rows(ps.t(), pt.t()), varies))
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + inter + intra, {
            "ce": ce.detach(),
            "inter": inter.detach(),
            "intra": intra.detach(),
        }
