"""FitNet hints: MSE between teacher feature maps and adapted student feature maps.

The adaptor (a 1x1 conv from student to teacher channels per layer) is learnable, so it must
exist before the optimizer is made: pass ``student_channels``/``teacher_channels`` or call
``build`` with the layer shapes, then move the loss to the device and give ``loss.parameters()``
to the optimizer together with the student's.
"""

from __future__ import annotations

import warnings
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


@register
class FitNet(Loss):
    """``L = ce_weight·CE + feat_weight·Σ_layers MSE(resize(adaptor(Fs)), Ft)``.

    ``layers``: "layer3" or "student=teacher" pairs; ``student_channels``/``teacher_channels``
    (one per layer, optional) build the adaptors at construction. A student map of another
    H×W is resized bilinearly to the teacher's.
    """

    name = "fitnet"
    needs = frozenset({"features:full"})
    feature_modes = ("full",)
    scope = "sample"
    source = "Romero et al., arXiv 1412.6550"
    defaults = {
        "layers": (),
        "student_channels": (),
        "teacher_channels": (),
        "ce_weight": 1.0,
        "feat_weight": 100.0,
    }
    layers: tuple[str, ...]
    student_channels: tuple[int, ...]
    teacher_channels: tuple[int, ...]
    ce_weight: float
    feat_weight: float

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.pairs = parse_layers(self.name, self.layers)
        self.adaptors = torch.nn.ModuleDict()
        if self.student_channels or self.teacher_channels:
            counts = {len(self.student_channels), len(self.teacher_channels), len(self.pairs)}
            if len(counts) != 1:
                raise InvalidSpec(
                    f"loss {self.name}: give one student and one teacher channel count per "
                    f"layer ({len(self.pairs)} layers) — e.g. student_channels=64 "
                    "teacher_channels=256"
                )
            try:
                channels = [
                    (int(cs), int(ct))
                    for cs, ct in zip(self.student_channels, self.teacher_channels, strict=True)
                ]
            except ValueError:
                raise InvalidSpec(
                    f"loss {self.name}: channel counts must be integers — e.g. student_channels=64"
                ) from None
            for index, (cs, ct) in enumerate(channels):
                self._add_adaptor(index, cs, ct)

    def layer_pairs(self) -> list[tuple[str, str]]:
        return self.pairs

    def build(
        self, student_shapes: dict[str, tuple[int, ...]], teacher_shapes: dict[str, tuple[int, ...]]
    ) -> None:
        """Create each layer's adaptor from [B,]C,H,W shapes keyed by teacher layer name."""
        for index, (student_layer, layer) in enumerate(self.pairs):
            if layer not in student_shapes:
                raise InvalidSpec(
                    f"loss {self.name}: no student shape for layer {student_layer} "
                    f"(paired with teacher layer {layer}) — check layers="
                )
            if layer not in teacher_shapes:
                raise CacheMismatch(
                    f"loss {self.name}: the cache has no full feature maps of teacher layer "
                    f"{layer} — re-run precompute with --features {layer}:full"
                )
            self._add_adaptor(index, student_shapes[layer][-3], teacher_shapes[layer][-3])

    def _add_adaptor(self, index: int, cs: int, ct: int, device: Any = None) -> None:
        key = str(index)
        if key in self.adaptors:
            conv = self.adaptors[key]
            if (conv.in_channels, conv.out_channels) != (cs, ct):
                raise InvalidSpec(
                    f"loss {self.name}: the adaptor for layer {self.pairs[index][1]} maps "
                    f"{conv.in_channels}->{conv.out_channels} channels but the nets have "
                    f"{cs}->{ct} — fix student_channels/teacher_channels"
                )
            return
        self.adaptors[key] = torch.nn.Conv2d(cs, ct, kernel_size=1, device=device)

    def forward(
        self, student: StudentOutput, teacher: TeacherBatch, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feat = student.logits.new_zeros((), dtype=torch.float32)
        for index, (_, layer) in enumerate(self.pairs):
            f_t, f_s = teacher.features.get(layer), student.features.get(layer)
            if f_t is None or f_t.dim() != 4:
                raise CacheMismatch(
                    f"loss {self.name} needs full [B,C,H,W] teacher maps of layer {layer} "
                    f"— re-run precompute with --features {layer}:full"
                )
            if f_s is None or f_s.dim() != 4:
                raise InvalidSpec(
                    f"loss {self.name} needs the student's [B,C,H,W] features paired with "
                    f"teacher layer {layer} — hook the student layer named in layers="
                )
            if str(index) not in self.adaptors:
                warnings.warn(
                    f"loss {self.name}: adaptor for layer {layer} created on first forward; an "
                    "optimizer made before now will not train it — call loss.build() first",
                    stacklevel=2,
                )
                self._add_adaptor(index, f_s.shape[1], f_t.shape[1], device=f_s.device)
            adapted = self.adaptors[str(index)](f_s.float())
            if adapted.shape[-2:] != f_t.shape[-2:]:
                adapted = F.interpolate(
                    adapted, size=tuple(f_t.shape[-2:]), mode="bilinear", align_corners=False
                )
            feat = feat + F.mse_loss(adapted, f_t.float())
        feat = self.feat_weight * feat
        ce = self.ce_weight * cross_entropy(student.logits, batch)
        return ce + feat, {"ce": ce.detach(), "feat": feat.detach()}
