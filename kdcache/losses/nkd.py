"""Normalized KD: the target term and a renormalised non-target distribution, separately."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.losses.base import (
    Batch,
    Loss,
    StudentOutput,
    TeacherBatch,
    cross_entropy,
    softmax_rows,
    teacher_scores,
)
from kdcache.losses.registry import register


@register
class NKD(Loss):
    """``L = ce_weight·CE - mean_i pt_iy·log ps_iy - gamma·T²·mean_i Σ_{c≠y} q̂t·log q̂s``.

    ``q̂ = softmax`` of the non-target logits over T; ``y`` is the sample's own label.
    Defaults are the CIFAR ones (T=3, gamma=3.5); ImageNet uses T=1, gamma=1.5.
    """

    name = "nkd"
    needs = frozenset({"probs"})
    scope = "sample"
    source = "Yang et al., arXiv 2303.13005"
    sparse = (
        "approximate: log p stands in for zt; the tail is uniform (top-k) or zero (sampled); a view with no "
        "non-target mass has a non-target term of 0"
    )
    defaults = {"T": 3.0, "gamma": 3.5, "ce_weight": 1.0}
    positive = ("T",)
    T: float
    gamma: float
    ce_weight: float

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        y = batch.labels.unsqueeze(1)
        pt_y = softmax_rows(zt).gather(1, y)
        log_ps_y = F.log_softmax(zs, dim=1).gather(1, y)
        target = -(pt_y * log_ps_y).mean()
        rows, classes = zs.shape
        other = ~F.one_hot(batch.labels, classes).bool()
        zs_o, zt_o = zs[other].view(rows, classes - 1), zt[other].view(rows, classes - 1)
        cross = (softmax_rows(zt_o, self.T) * F.log_softmax(zs_o / self.T, dim=1)).sum(1)
        non_target = -self.gamma * self.T**2 * cross.mean()
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + target + non_target, {
            "ce": ce.detach(),
            "target": target.detach(),
            "non_target": non_target.detach(),
        }
