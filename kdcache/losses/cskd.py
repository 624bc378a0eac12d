"""Cosine-similarity KD: per-class cosine along the batch axis, plus weighted temperatures.

Batch-level: each class column compares the student's and teacher's probabilities across the
rows of the batch, so results depend on the per-device batch size.
"""

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
    mean_over,
    softmax_rows,
    teacher_scores,
)
from kdcache.losses.registry import register

_CS_TOL = 1e-6  # cosine spans below this are float32 rounding noise, not a real spread


def class_cosine_distance(ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """``L_CS = 1 - mean_c cos(Ps[:,c], Pt[:,c])``: cosine along the batch axis per class, over the
    classes the teacher gives mass in the batch (all of them, unless the cache is sampled)."""
    return 1 - mean_over(F.cosine_similarity(ps, pt, dim=0), pt.sum(0) > 0)


@register
class CSKD(Loss):
    """``L = ce_weight·CE + 2·T²·L_CS(T) + 2·mean(T_i)²·L_CS(T_i)`` (the last term is CSWT).

    CSWT: ``cs_i = cos(softmax(zs_i), softmax(zt_i))`` without gradient and
    ``T_i = t_low + (t_high - t_low)·(cs_max - cs_i)/(cs_max - cs_min)`` over the batch;
    when the ``cs_i`` are all equal (span < 1e-6, e.g. a batch of one) every
    ``T_i = (t_low + t_high)/2``.
    """

    name = "cskd"
    needs = frozenset({"probs"})
    scope = "batch"
    source = "Ham et al., arXiv 2311.14307"
    sparse = (
        "approximate: softmax(zt/T) and the CSWT cosines use p^(1/T) renormalised; the tail is uniform "
        "(top-k) or zero (sampled); the per-class means skip classes without mass in the batch"
    )
    defaults = {"T": 4.0, "t_low": 2.0, "t_high": 6.0, "ce_weight": 1.0}
    positive = ("T", "t_low", "t_high")
    T: float
    t_low: float
    t_high: float
    ce_weight: float

    def __init__(self, **hparams: float) -> None:
        super().__init__(**hparams)
        if self.t_low > self.t_high:
            raise InvalidSpec(
                f"loss {self.name}: t_low={self.t_low} > t_high={self.t_high} "
                "— e.g. t_low=2 t_high=6"
            )

    def cswt_temperatures(self, zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        """Per-sample temperatures [B]: the least teacher-like student rows get t_high."""
        with torch.no_grad():
            cs = F.cosine_similarity(F.softmax(zs, dim=1), softmax_rows(zt), dim=1)
            span = cs.max() - cs.min()
            frac = torch.where(
                span > _CS_TOL, (cs.max() - cs) / span.clamp_min(_CS_TOL), torch.full_like(cs, 0.5)
            )
            return self.t_low + (self.t_high - self.t_low) * frac

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        T = self.T
        cs = 2 * T**2 * class_cosine_distance(F.softmax(zs / T, dim=1), softmax_rows(zt, T))
        Ti = self.cswt_temperatures(zs, zt).unsqueeze(1)
        cswt = (
            2
            * Ti.mean() ** 2
            * class_cosine_distance(F.softmax(zs / Ti, dim=1), softmax_rows(zt, Ti))
        )
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + cs + cswt, {"ce": ce.detach(), "cs": cs.detach(), "cswt": cswt.detach()}
