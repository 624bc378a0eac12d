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
    softmax_rows,
    teacher_scores,
)
from kdcache.losses.registry import register


def finite_std(scores: torch.Tensor) -> torch.Tensor:
    """Unbiased std [B,1] of each row's finite entries (all of them for dense logits; the classes
    with non-zero probability for a sampled cache). A row with fewer than two is a one-hot
    distribution, which no temperature changes, so it gets 1."""
    finite = torch.isfinite(scores)
    n = finite.sum(1, keepdim=True)
    mean = torch.where(finite, scores, 0).sum(1, keepdim=True) / n.clamp_min(1)
    var = torch.where(finite, scores - mean, 0).pow(2).sum(1, keepdim=True) / (n - 1).clamp_min(1)
    return torch.where(n >= 2, var.sqrt(), torch.ones_like(var))


@register
class MixKD(Loss):
    """``L = ce_weight·CE_mixed + kd_weight·mean_i KL(softmax(zt_i/σt_i) || softmax(zs_i/σs_i))``.

    ``σ`` = standard deviation (unbiased) of the row's logits: the student's own for the student
    (gradient flows through it), the teacher's for the teacher; no T² factor. The teacher
    logits are those of the mixed views, precomputed.
    """

    name = "mixkd"
    needs = frozenset({"probs"})
    scope = "sample"
    source = "Choi et al., arXiv 2211.03946"
    sparse = (
        "approximate: sigma_t is the std of log p over the classes with p > 0 (a row with one such class is "
        "left as it is); the target is p^(1/sigma_t) renormalised"
    )
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9}
    ce_weight: float
    kd_weight: float

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        sigma_s = zs.std(dim=1, keepdim=True).clamp_min(1e-6)
        sigma_t = finite_std(zt).clamp_min(1e-6)
        kl = kl_rows(softmax_rows(zt, sigma_t), F.log_softmax(zs / sigma_s, dim=1))
        kd = self.kd_weight * kl.mean()
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + kd, {"ce": ce.detach(), "kd": kd.detach()}
