"""Plain supervised cross-entropy: the no-teacher baseline, also used to train teachers."""

from __future__ import annotations

import torch

from kdcache.losses.base import Batch, Loss, StudentOutput, TeacherBatch, cross_entropy
from kdcache.losses.registry import register


@register
class CE(Loss):
    """``L = CE(zs, y)``, against the mixed labels when the view is a mix."""

    name = "ce"
    needs = frozenset()
    scope = "sample"
    source = "—"
    defaults = {}

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = cross_entropy(student.logits, batch)
        return ce, {"ce": ce.detach()}
