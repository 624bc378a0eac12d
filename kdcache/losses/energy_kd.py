"""Energy-based KD: a per-view temperature set by where the teacher's energy falls in the cache.

The teacher energy ``E = -T_E·logsumexp(zt/T_E)`` is low for confident views. Thresholds are
quantiles of the energies of the whole cache, computed once in ``prepare``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.errors import CacheCorrupt, CacheMismatch, InvalidSpec
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
from kdcache.losses.dkd import dkd_terms, warmup_factor
from kdcache.losses.registry import register

_ENERGY_DEFAULTS = {
    "r_low": 0.2,
    "r_high": 0.2,
    "t_low": 2.0,
    "t_mid": 4.0,
    "t_high": 6.0,
    "mapping": "paper",
}


@register
class EnergyKD(Loss):
    """``L = ce_weight·CE + kd_weight·mean_i T_i²·KL(pt_i^{T_i} || ps_i^{T_i})``.

    ``T_i`` is ``t_mid`` unless the view's energy is <= the ``r_low`` quantile (low energy,
    confident) or >= the ``1-r_high`` quantile (high energy). ``mapping="paper"`` gives
    low-energy views ``t_high`` and high-energy views ``t_low``; ``mapping="code"`` (the authors'
    released code) does the reverse. Mixed views (HE-DA, ``batch.mixed``) always get ``t_mid``.
    """

    name = "energy_kd"
    needs = frozenset({"probs", "energy"})
    scope = "sample"
    source = "Kim et al., arXiv 2311.14334"
    sparse = (
        "temperatures exact (the stored energies come from the full logits); the KL target is p^(1/T_i) "
        "renormalised, as for kd"
    )
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, **_ENERGY_DEFAULTS}
    positive = ("t_low", "t_mid", "t_high")
    r_low: float
    r_high: float
    t_low: float
    t_mid: float
    t_high: float
    mapping: str

    def __init__(self, **hparams: float | str) -> None:
        super().__init__(**hparams)
        if self.mapping not in {"paper", "code"}:
            raise InvalidSpec(
                f"loss {self.name}: mapping={self.mapping!r} is unknown — use paper or code"
            )
        if not (0 <= self.r_low <= 1 and 0 <= self.r_high <= 1 and self.r_low + self.r_high <= 1):
            raise InvalidSpec(
                f"loss {self.name}: r_low={self.r_low}, r_high={self.r_high} must lie in [0, 1] "
                "and sum to at most 1 — e.g. r_low=0.2 r_high=0.2"
            )
        self.thresholds: tuple[float, float] | None = None

    def prepare(self, energies: torch.Tensor | None) -> None:
        """Set (tau_low, tau_high) = quantiles r_low and 1-r_high of all cached energies."""
        if energies is None or energies.numel() == 0:
            raise CacheMismatch(
                f"loss {self.name} needs the teacher energies of the whole cache; this cache "
                "has none — re-run precompute with energy outputs enabled"
            )
        values = energies.detach().flatten().double().cpu().numpy()
        if not np.isfinite(values).all():
            raise CacheCorrupt(
                f"loss {self.name}: the cached teacher energies contain NaN or inf "
                "— run kdcache verify on the cache and re-run precompute for bad shards"
            )
        low, high = np.quantile(values, [self.r_low, 1 - self.r_high])
        self.thresholds = (float(low), float(high))

    def temperatures(self, energy: torch.Tensor | None, mixed: torch.Tensor | None) -> torch.Tensor:
        """Per-view temperature [B] from the view's teacher energy."""
        if self.thresholds is None:
            raise InvalidSpec(
                f"loss {self.name} has no energy thresholds — call loss.prepare(<all cached "
                "energies>) before training"
            )
        if energy is None:
            raise CacheMismatch(
                f"loss {self.name} got a batch without teacher energies "
                "— re-run precompute with energy outputs enabled"
            )
        low, high = self.thresholds
        confident, unsure = (
            (self.t_high, self.t_low) if self.mapping == "paper" else (self.t_low, self.t_high)
        )
        energy = energy.float()
        T = torch.full_like(energy, self.t_mid)
        T = torch.where(energy >= high, torch.full_like(T, unsure), T)
        T = torch.where(energy <= low, torch.full_like(T, confident), T)
        if mixed is not None:
            T = torch.where(mixed.to(T.device), torch.full_like(T, self.t_mid), T)
        return T

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        T = self.temperatures(teacher.energy, batch.mixed).unsqueeze(1)
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        kl = kl_rows(softmax_rows(zt, T), F.log_softmax(zs / T, dim=1))
        kd = self.kd_weight * (T.squeeze(1) ** 2 * kl).mean()
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + kd, {"ce": ce.detach(), "kd": kd.detach()}


@register
class EnergyDKD(EnergyKD):
    """DKD whose TCKD/NCKD are computed per view at ``T_i`` and scaled by ``T_i²``.

    ``L = ce_weight·CE + min(epoch/warmup, 1)·mean_i T_i²·(alpha·TCKD_i + beta·NCKD_i)``.
    """

    name = "energy_dkd"
    sparse = (
        "temperatures exact (the stored energies come from the full logits); TCKD and NCKD as for dkd"
    )
    defaults = {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "warmup": 20, **_ENERGY_DEFAULTS}
    alpha: float
    beta: float
    warmup: int

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        T = self.temperatures(teacher.energy, batch.mixed).unsqueeze(1)
        zs, zt = student.logits.float(), teacher_scores(self.name, teacher)
        tckd, nckd = dkd_terms(zs, zt, batch.labels, T)
        scale = warmup_factor(batch.epoch, self.warmup) * T.squeeze(1) ** 2
        tc = self.alpha * (scale * tckd).mean()
        nc = self.beta * (scale * nckd).mean()
        ce = self.ce_weight * cross_entropy(zs, batch)
        return ce + tc + nc, {"ce": ce.detach(), "tckd": tc.detach(), "nckd": nc.detach()}
