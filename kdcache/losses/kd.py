"""Hinton's knowledge distillation: KL between temperature-softened distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.losses.base import (
    Batch,
    Loss,
    StudentOutput,
    TeacherBatch,
    cross_entropy,
    kl_rows,
    teacher_log_probs,
)
from kdcache.losses.registry import register


@register
class KD(Loss):
    """``L = ce_weight·CE + kd_weight·T²·mean_i KL(pt_i^T || ps_i^T)``.

    With a sparse cache the teacher distribution at temperature T is approximated by tempering
    the densified probabilities, ``p^(1/T)`` renormalised (exact for dense probabilities).
    """

    name = "kd"
    needs = frozenset({"probs"})
    scope = "sample"
    source = "Hinton et al., arXiv 1503.02531"
    sparse = (
        "approximate: the target p^(1/T) renormalised, p the densified distribution; top-k's tail is uniform "
        "and T>1 lifts it; at T=1 a sampled cache gives an unbiased gradient"
    )
    defaults = {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    positive = ("T",)
    T: float
    ce_weight: float
    kd_weight: float

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        log_pt = teacher_log_probs(self.name, teacher, self.T)
        log_ps = F.log_softmax(student.logits.float() / self.T, dim=1)
        kd = self.kd_weight * self.T**2 * kl_rows(log_pt.exp(), log_ps).mean()
        ce = self.ce_weight * cross_entropy(student.logits, batch)
        return ce + kd, {"ce": ce.detach(), "kd": kd.detach()}
