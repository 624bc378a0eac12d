"""Plackett-Luce distillation: a ranking loss over the teacher's order, target class first."""

from __future__ import annotations

import torch

from kdcache.losses.base import (
    Batch,
    Loss,
    StudentOutput,
    TeacherBatch,
    softmax_rows,
    teacher_scores,
)
from kdcache.losses.registry import register


@register
class PLD(Loss):
    """``L = mean_i Σ_k qt(π_k)·[logsumexp_{l≥k} zs_{π_l} - zs_{π_k}]``, no CE.

    ``π`` = [label, then the other classes by descending teacher logit], ``qt = softmax(zt/T)``.
    """

    name = "pld"
    needs = frozenset({"probs"})
    scope = "sample"
    source = "PLD (Plackett-Luce distillation), arXiv 2506.12542"
    sparse = (
        "approximate: classes are ranked by p and tied classes (top-k's uniform tail, unsampled classes) keep"
        " class order; qt is p^(1/T) renormalised"
    )
    defaults = {"T": 1.0}
    positive = ("T",)
    T: float

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        label_first = zt.scatter(1, batch.labels.unsqueeze(1), float("inf"))
        order = torch.sort(label_first, dim=1, descending=True, stable=True).indices
        zs_ranked = zs.gather(1, order)
        q_ranked = softmax_rows(zt, self.T).gather(1, order)
        suffix_lse = torch.logcumsumexp(zs_ranked.flip(1), dim=1).flip(1)
        kd = (q_ranked * (suffix_lse - zs_ranked)).sum(1).mean()
        return kd, {"kd": kd.detach()}
