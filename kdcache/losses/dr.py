"""Dataset reinforcement: match the stored teacher distribution, no hard labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.losses.base import (
    Batch,
    Loss,
    StudentOutput,
    TeacherBatch,
    kl_rows,
    teacher_log_probs,
)
from kdcache.losses.registry import register


@register
class DR(Loss):
    """``L = mean_i KL(q_i || softmax(zs_i))`` at T=1, no CE.

    ``q`` is ``softmax(zt)`` for a dense cache and the densified probabilities of a sparse one
    (top-k: the missing mass spread uniformly over the other classes; sampled: counts / N).
    """

    name = "dr"
    needs = frozenset({"probs"})
    scope = "sample"
    source = "Faghri et al. (dataset reinforcement), arXiv 2303.08983"
    sparse = (
        "approximate: the target is the densified distribution (the paper's own target for its top-k sets); a"
        " sampled cache gives an unbiased gradient"
    )
    defaults = {}

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q = teacher_log_probs(self.name, teacher, 1.0).exp()
        kd = kl_rows(q, F.log_softmax(student.logits.float(), dim=1)).mean()
        return kd, {"kd": kd.detach()}
