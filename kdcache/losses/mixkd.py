"""MixKD: KD on (partially) mixed views; each row's temperature is the std of its logits."""

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
    teacher_logits,
)
from kdcache.losses.registry import register


@register
class MixKD(Loss):
    """``L = ce_weight·CE_mixed + kd_weight·mean_i KL(softmax(zt_i/σt_i) || softmax(zs_i/σs_i))``.

    ``σ`` = standard deviation (unbiased) of the row's logits: the student's own for the student
    (gradient flows through it), the teacher's for the teacher; no T² factor. The teacher
    logits are those of the mixed views, precomputed.
    """

    name = "mixkd"
    needs = frozenset({"logits"})
    scope = "sample"
    source = "Choi et al., arXiv 2211.03946"
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9}
    ce_weight: float
    kd_weight: float

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zs, zt = student.logits.float(), teacher_logits(self.name, teacher)
        sigma_s = zs.std(dim=1, keepdim=True).clamp_min(1e-6)
        sigma_t = zt.std(dim=1, keepdim=True).clamp_min(1e-6)
        kl = kl_rows(F.softmax(zt / sigma_t, dim=1), F.log_softmax(zs / sigma_s, dim=1))
        kd = self.kd_weight * kl.mean()
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + kd, {"ce": ce.detach(), "kd": kd.detach()}
