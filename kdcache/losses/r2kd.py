"""Robustness-reinforced KD: cosine (correlation) distance per sample and per class.

Batch-level through the per-class term; results depend on the per-device batch size.
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


@register
class R2KD(Loss):
    """``L = ce_weight·CE + 2·T²·[(1 - mean_i cos(Ps_i,Pt_i)) + (1 - mean_c cos(Ps_c,Pt_c))]``.

    ``Ps_i`` is a row (sample) of softmax(zs/T), ``Ps_c`` a column (class) across the batch.

    The teacher logits may be the blend ``0.7·zt + 0.3·zt_pruned`` written by precompute. The
    released rank-based term carries no gradient and is left out.
    """

    name = "r2kd"
    needs = frozenset({"probs"})
    scope = "batch"
    source = "Kim et al., arXiv 2311.13934"
    sparse = (
        "approximate: softmax(zt/T) is p^(1/T) renormalised; the tail is uniform (top-k) or zero (sampled); "
        "the per-class mean skips classes without mass in the batch"
    )
    defaults = {"T": 4.0, "ce_weight": 1.0}
    positive = ("T",)
    T: float
    ce_weight: float

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        ps, pt = F.softmax(zs / self.T, dim=1), softmax_rows(zt, self.T)
        scale = 2 * self.T**2
        inter = scale * (1 - F.cosine_similarity(ps, pt, dim=1).mean())
        intra = scale * (1 - mean_over(F.cosine_similarity(ps, pt, dim=0), pt.sum(0) > 0))
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + inter + intra, {
            "ce": ce.detach(),
            "inter": inter.detach(),
            "intra": intra.detach(),
        }
