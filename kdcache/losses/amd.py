"""Angular-margin distillation on spatial attention maps of chosen layers.

Only the teacher's attention map per layer per view needs caching (H·W floats), not its full
feature maps; a cache with full maps of the layer works too (the map is computed from them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdcache.errors import CacheMismatch, InvalidSpec
from kdcache.losses.base import (
    Batch,
    Loss,
    StudentOutput,
    TeacherBatch,
    cross_entropy,
    parse_layers,
)
from kdcache.losses.registry import register

_CLAMP = 1e-7  # keeps arccos' gradient finite at q = 1


def attention(fmap: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Flattened, L2-normalised attention map ``q`` [B, H·W] of a [B,C,H,W] or [B,H,W] map.

    A full map is reduced to ``a = Σ_c F_c²``; a [B,H,W] map is taken as ``a`` (or an already
    normalised ``q``). With ``size`` the map is resized bilinearly to that H×W first.
    """
    a = (fmap.float() ** 2).sum(1) if fmap.dim() == 4 else fmap.float()
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    a = a.flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + 1e-6)


def angular_parts(
    q: torch.Tensor, s: float, m: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, P, N) with ``P = s·cos(m·arccos q)``, ``N = s·(1-q)``, ``G = P - log(e^P + e^N)``."""
    P = s * torch.cos(m * torch.acos(q.clamp(-1 + _CLAMP, 1 - _CLAMP)))
    N = s * (1 - q)
    return P - torch.logaddexp(P, N), P, N


def amd_layer(q_s: torch.Tensor, q_t: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """``(MSE(n(Gs),n(Gt)) + MSE(n(Ps),n(Pt)) + MSE(n(Ns),n(Nt)))/3``, n = L2 over H·W."""
    parts = zip(angular_parts(q_s, s, m), angular_parts(q_t, s, m), strict=True)
    return sum(F.mse_loss(F.normalize(a, dim=1), F.normalize(b, dim=1)) for a, b in parts) / 3


@register
class AMD(Loss):
    """``L = ce_weight·CE + feat_weight·Σ_layers L_AMD(layer)``.

    The student's map comes from its full features of the paired layer, resized to the
    teacher's H×W. ``layers``: "layer3" (same name in both nets) or "student=teacher" pairs.
    """

    name = "amd"
    needs = frozenset({"features:attention"})
    feature_modes = ("attention", "full")
    scope = "sample"
    source = "Jeon et al., arXiv 2302.14130"
    defaults = {"layers": (), "s": 64.0, "m": 1.35, "ce_weight": 1.0, "feat_weight": 1.0}
    positive = ("s", "m")
    layers: tuple[str, ...]
    s: float
    m: float
    ce_weight: float
    feat_weight: float

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.pairs = parse_layers(self.name, self.layers)

    def layer_pairs(self) -> list[tuple[str, str]]:
        return self.pairs

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feat = student.logits.new_zeros((), dtype=torch.float32)
        for _, layer in self.pairs:
            t_map = teacher.features.get(layer)
            s_map = student.features.get(layer)
            if t_map is None:
                raise CacheMismatch(
                    f"loss {self.name} got no teacher map for layer {layer} "
                    f"— re-run precompute with --features {layer}:attention"
                )
            if s_map is None or s_map.dim() != 4:
                raise InvalidSpec(
                    f"loss {self.name} needs the student's [B,C,H,W] features paired with "
                    f"teacher layer {layer} — hook the student layer named in layers="
                )
            q_t = attention(t_map)
            q_s = attention(s_map, size=tuple(t_map.shape[-2:]))
            feat = feat + amd_layer(q_s, q_t, self.s, self.m)
        feat = self.feat_weight * feat
        ce = self.ce_weight * cross_entropy(student.logits, batch)
        return ce + feat, {"ce": ce.detach(), "feat": feat.detach()}
