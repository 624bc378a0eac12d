"""What every distillation loss shares: the inputs it receives, the base class, small helpers.

A loss sees three things: the student's outputs, the teacher's cached outputs for the same views,
and the batch's labels. It declares which teacher outputs it needs so that a cache lacking them is
refused before training starts, not halfway through the first epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kdcache.errors import CacheMismatch, InvalidSpec

NEEDS = frozenset(
    {"logits", "probs", "energy", "features:attention", "features:full", "features:pooled"}
)

_MODE_WORDS = {
    "attention": "attention maps",
    "full": "full feature maps",
    "pooled": "pooled features",
}


@dataclass
class TeacherBatch:
    """The teacher's cached outputs for one batch of views."""

    logits: torch.Tensor | None = None  # [B,C] dense logits; None for sparse caches
    probs: torch.Tensor | None = None  # [B,C] densified target probabilities (sparse caches)
    energy: torch.Tensor | None = None  # [B] energy of each view at the cache's energy temperature
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # teacher layer -> map


@dataclass
class StudentOutput:
    """The student's outputs; features are keyed by the teacher layer they are paired with."""

    logits: torch.Tensor  # [B,C]
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # [B,C,H,W]


@dataclass
class Batch:
    """What a loss gets besides the two outputs."""

    labels: torch.Tensor  # int64 [B]; for mixed views the sample's own label
    soft_labels: torch.Tensor | None = None  # [B,C] lam*y_i + (1-lam)*y_j for mixed views
    epoch: int = 0  # 0-based
    mixed: torch.Tensor | None = None  # bool [B], which views are mixes
    label_smoothing: float = 0.0  # eps: the CE target is (1 - eps) * labels + eps / C (train --label-smoothing)


class Loss(torch.nn.Module):
    """Base class of every loss: validated hyper-parameters, declared needs, a checked cache.

    Subclasses set the class variables, implement ``forward`` and register with
    ``@register``. Hyper-parameters become attributes (``self.T``) after validation.
    ``forward`` returns ``(total, terms)`` where ``terms`` holds each weighted contribution,
    detached, so that ``total == sum(terms.values())``.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    scope: ClassVar[str]  # "sample" or "batch"
    source: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    feature_modes: ClassVar[tuple[str, ...]] = ()  # cached map modes usable for each layer
    sparse: ClassVar[str] = ""  # what a top-k or sampled cache gives the loss; "" if it reads no logits
    positive: ClassVar[tuple[str, ...]] = ()  # hyper-parameters that must be > 0 (temperatures, margins)

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise InvalidSpec(
                f"loss {self.name} has no hyper-parameter {', '.join(unknown)} "
                f"— it accepts: {accepted}"
            )
        self.hparams = dict(self.defaults)
        for key, value in hparams.items():
            self.hparams[key] = _coerce(self.name, key, value, self.defaults[key])
        for key, value in self.hparams.items():
            setattr(self, key, value)
        self.require_positive(*self.positive)

    def prepare(self, energies: torch.Tensor | None) -> None:
        """Look once at all cached teacher energies before training; most losses need not."""

    def build(
        self, student_shapes: dict[str, tuple[int, ...]], teacher_shapes: dict[str, tuple[int, ...]]
    ) -> None:
        """Create learnable parts (adaptors) before the optimizer exists; most losses have none.

        Both dicts are keyed by teacher layer name; shapes may include the batch axis or not.
        """

    def layer_pairs(self) -> list[tuple[str, str]]:
        """(student layer, teacher layer) pairs this loss uses; empty for logit losses."""
        return []

    def check(self, available: set[str]) -> None:
        """Refuse, in one line, a cache that lacks a teacher output this loss needs.

        ``available`` holds "logits" (dense logits), "probs" (dense or sparse logits),
        "energy" and "features:<mode>:<layer>" for each cached feature layer.
        """
        for need in ("logits", "probs", "energy"):
            if need in self.needs and need not in available:
                raise CacheMismatch(self._missing(need, available))
        for _, layer in self.layer_pairs():
            if not any(f"features:{mode}:{layer}" in available for mode in self.feature_modes):
                mode = self.feature_modes[0]
                raise CacheMismatch(
                    f"loss {self.name} needs {_MODE_WORDS[mode]} of teacher layer {layer}; "
                    f"this cache has none — re-run precompute with --features {layer}:{mode}"
                )

    def require_positive(self, *names: str) -> None:
        """Raise InvalidSpec unless each named hyper-parameter is > 0."""
        for key in names:
            if not self.hparams[key] > 0:
                raise InvalidSpec(
                    f"loss {self.name}: {key}={self.hparams[key]} must be > 0 "
                    f"— e.g. {key}={self.defaults[key]}"
                )

    def _missing(self, need: str, available: set[str]) -> str:
        if need == "logits" and "probs" in available:
            return (
                f"loss {self.name} needs dense teacher logits; this cache holds sparse "
                "(top-k or sampled) probabilities only — re-run precompute with --logits dense"
            )
        if need == "energy":
            return (
                f"loss {self.name} needs teacher energies; this cache has none "
                "— re-run precompute with energy outputs enabled"
            )
        return (
            f"loss {self.name} needs teacher logits; this cache has none "
            "— re-run precompute with logits enabled"
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


def _coerce(loss: str, key: str, value: Any, default: Any) -> Any:
    """Turn a value (possibly a CLI string) into the type of the hyper-parameter's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                return value.lower() in {"true", "1", "yes"}
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(part.strip() for part in value.split(",") if part.strip())
            if isinstance(value, (list, tuple)):
                return tuple(value)
            return (value,)
        return str(value)
    except (TypeError, ValueError):
        raise InvalidSpec(
            f"loss {loss}: {key}={value!r} is not a valid {type(default).__name__} "
            f"— e.g. {key}={default!r}"
        ) from None


def parse_layers(loss: str, layers: tuple[str, ...]) -> list[tuple[str, str]]:
    """Parse ``layers`` entries "layer3" (same name in both nets) or "student=teacher"."""
    if not layers:
        raise InvalidSpec(
            f"loss {loss} needs the hyper-parameter layers — e.g. layers=layer3 "
            "or layers=layer4=layer3 (student=teacher)"
        )
    pairs = []
    for entry in layers:
        student, sep, teacher = str(entry).partition("=")
        if not student or (sep and not teacher) or "=" in teacher:
            raise InvalidSpec(
                f"loss {loss}: layer {entry!r} is not 'name' or 'student=teacher' "
                "— e.g. layers=layer3 or layers=layer4=layer3"
            )
        pairs.append((student, teacher or student))
    return pairs


def cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean CE against the soft (mixed) labels when the batch has them, else the hard labels; with
    label smoothing eps the target is ``(1 - eps) * target + eps / C``, as ``F.cross_entropy`` defines it."""
    logits = logits.float()
    eps = float(batch.label_smoothing)
    if batch.soft_labels is not None:
        target = batch.soft_labels.float()
        if eps:
            target = (1 - eps) * target + eps / logits.shape[1]
        return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    return F.cross_entropy(logits, batch.labels, label_smoothing=eps)


def kl_rows(target: torch.Tensor, log_pred: torch.Tensor) -> torch.Tensor:
    """Per-row KL(target || pred) [B]; zero-probability targets contribute nothing."""
    return (torch.xlogy(target, target) - target * log_pred).sum(1)


def teacher_scores(loss: str, teacher: TeacherBatch) -> torch.Tensor:
    """The teacher's logits as float32 [B,C]; from a sparse cache, ``log p`` of the densified
    distribution (``-inf`` where p = 0).

    ``log softmax(zt) = zt - logsumexp(zt)``, so ``log p`` equals the logits up to a per-row
    constant, and every function of ``softmax(zt/T)``, ranks or the logits' spread reads it as the
    logits. Where ``p`` is exact (dense, top-k's own classes) the loss is exact; the tail (uniform
    for top-k, zero for unsampled classes) is the approximation docs/losses.md states.
    """
    if teacher.logits is not None:
        return teacher.logits.float()
    if teacher.probs is not None:
        return torch.log(teacher.probs.float())
    raise CacheMismatch(
        f"loss {loss} got a batch without teacher logits or probabilities "
        "— check that the cache holds logits"
    )


def softmax_rows(scores: torch.Tensor, T: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``softmax(scores / T)`` per row, with rows that are all ``-inf`` (no mass at all, e.g. the
    non-target classes of a sampled view whose every draw hit its label) set to zeros, not NaN."""
    return torch.nan_to_num(F.softmax(scores / T, dim=1), nan=0.0)


def mean_over(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``keep``: the batch-level losses average their per-class terms over
    the classes the teacher gives some spread in this batch. A class no view has mass on (possible
    only from a sampled cache) has no defined correlation and would only dilute the others."""
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1)


def teacher_log_probs(loss: str, teacher: TeacherBatch, T: float | torch.Tensor) -> torch.Tensor:
    """log softmax(zt/T); from probabilities (sparse caches) as log of p^(1/T) renormalised.

    For dense probabilities the two agree exactly; for a densified sparse cache the tempering
    also lifts the uniformly spread tail, which is the documented approximation.
    """
    return F.log_softmax(teacher_scores(loss, teacher) / T, dim=1)
