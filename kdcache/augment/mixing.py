"""MixUp and CutMix with a stored partner, lambda and (for CutMix) box.

A mixed view blends the sample's own rendered view with its partner's rendered view (the partner
gets its own stored geometric/colour/erase params). Lambda is the weight of the sample's own label
and its own pixels; unmixed views store partner -1 and lambda 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch

from kdcache.augment.op import MIX, Fields, Op, box_row, check_range, format_number, outside, unit_boxes
from kdcache.augment.rng import Draws
from kdcache.errors import InvalidSpec


@dataclasses.dataclass(frozen=True)
class MixOp(Op):
    """Shared sampling of the mixing decision, partner index and raw lambda."""

    stage = MIX
    version = 2  # 2: lambda from the exact Philox-based Beta sampler (version 1 inverted scipy's Beta CDF)
    alpha: float = 1.0
    p: float = 1.0

    def __post_init__(self) -> None:
        check_range(self.name, "alpha", self.alpha, 0.0, math.inf, self.usage, open_low=True)
        check_range(self.name, "p", self.p, 0.0, 1.0, self.usage, open_low=True)

    @property
    def partner_field(self) -> str:
        return f"{self.name}_partner"

    @property
    def lam_field(self) -> str:
        return f"{self.name}_lam"

    def fields(self) -> Fields:
        return {self.partner_field: ((), "int64"), self.lam_field: ((), "float32")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        return super().check_stored(params, num_samples) \
            or outside(self.partner_field, params[self.partner_field], -1, num_samples - 1) \
            or outside(self.lam_field, params[self.lam_field], 0.0, 1.0)

    def draw(self, draws: Draws, indices: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mixed flag, candidate partner, lambda ~ Beta(alpha, alpha)) per element."""
        mixed = draws.uniform(1)[:, 0] < self.p
        other = draws.below(num_samples - 1).astype(np.int64)
        other += other >= indices  # uniform over [0, num_samples) without the sample itself
        return mixed, other, draws.beta(self.alpha)

    def _draw(self, draws: Draws, indices: np.ndarray, num_samples: int,
              partner: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mixed flag, partner or -1, lambda); ``partner`` replaces the drawn candidate (a chain's shared one)."""
        mixed, other, lam = self.draw(draws, indices, num_samples)
        return mixed, np.where(mixed, other if partner is None else partner, -1), lam

    def sample_mix(self, draws: Draws, indices: np.ndarray, num_samples: int,
                   partner: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Params of the mixing step for a batch: partner index, lambda and any op-specific field. ``partner``:
        the candidate partners to mix with (those of the recipe's first mixing op, which every one shares)."""
        raise NotImplementedError

    def mix(self, own: torch.Tensor, other: torch.Tensor, row: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Blend two float32 [C,S,S] views by one view's stored params."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class MixUp(MixOp):
    """MixUp: lam * own + (1 - lam) * partner, lam ~ Beta(alpha, alpha), on a fraction p of views."""

    name = "mixup"
    usage = "mixup[:alpha[:p]], e.g. mixup:0.2 or mixup:0.2:0.5"
    args = ("alpha", "p")
    alpha: float = 0.2
    p: float = 1.0

    def sample_mix(self, draws: Draws, indices: np.ndarray, num_samples: int,
                   partner: np.ndarray | None = None) -> dict[str, np.ndarray]:
        mixed, partner, lam = self._draw(draws, indices, num_samples, partner)
        return {self.partner_field: partner, self.lam_field: np.where(mixed, lam, 1.0).astype(np.float32)}

    def mix(self, own: torch.Tensor, other: torch.Tensor, row: Mapping[str, np.ndarray]) -> torch.Tensor:
        lam = float(np.asarray(row[self.lam_field], dtype=np.float32))
        return (own * lam + other * (1.0 - lam)).clamp_(0.0, 1.0)


def coverage(start: int, stop: int, n: int, grid: int) -> np.ndarray:
    """Fraction of each of n pixels covered by [start, stop) in steps of 1/grid of the side.

    In whole lattice steps the edges fall on pixel edges exactly wherever ``grid`` divides ``n * edge``,
    so a box stored as pixels of the view's own size (an imported one, grid = size) pastes whole pixels.
    """
    edges = np.arange(n, dtype=np.float64)
    lo, hi = start * n / grid, stop * n / grid
    return np.clip(np.minimum(edges + 1, hi) - np.maximum(edges, lo), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class CutMix(MixOp):
    """CutMix: paste the partner's box (area 1 - lam) into the view, on a fraction p of views.

    The box is centred uniformly and clipped to the image like torchvision's CutMix, then its
    edges snap to a ``grid`` x ``grid`` lattice so that at any size that is a multiple of ``grid``
    it covers whole pixels. Stored lambda is 1 - (box area): the exact fraction of own pixels.
    At other sizes the pixels a box edge cuts are blended by their covered fraction, so the
    pasted area still equals 1 - lambda. Replay reads the box in whole lattice steps (the nearest
    step to each stored edge, which every sampled box lies on).
    """

    name = "cutmix"
    usage = "cutmix[:p] or cutmix:alpha:p, e.g. cutmix:0.5 (half of the views mixed)"
    args = ("alpha", "p")
    alpha: float = 1.0
    p: float = 1.0
    grid: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("cutmix", "grid", self.grid, 1, 4096, self.usage)

    @classmethod
    def parse(cls, args: list[str]) -> Op:
        return super().parse(["1", *args] if len(args) == 1 else args)  # "cutmix:p" is the short form

    def spec(self) -> str:
        if self.alpha != 1.0:  # both, since a single argument means p
            return f"cutmix:{format_number(self.alpha)}:{format_number(self.p)}"
        return super().spec() if self.p == 1.0 else f"cutmix:{format_number(self.p)}"

    def fields(self) -> Fields:
        return {**super().fields(), "cutmix_box": ((4,), "float32")}

    def check_stored(self, params: Mapping[str, np.ndarray], num_samples: int, prefix: str = "") -> str | None:
        return super().check_stored(params, num_samples) or unit_boxes("cutmix_box", params["cutmix_box"])

    def sample_mix(self, draws: Draws, indices: np.ndarray, num_samples: int,
                   partner: np.ndarray | None = None) -> dict[str, np.ndarray]:
        mixed, partner, lam = self._draw(draws, indices, num_samples, partner)
        centre = draws.uniform(2)
        half = 0.5 * np.sqrt(1.0 - lam)[:, None]
        lo = np.floor(np.clip(centre - half, 0.0, 1.0) * self.grid + 0.5) / self.grid
        hi = np.floor(np.clip(centre + half, 0.0, 1.0) * self.grid + 0.5) / self.grid
        box = np.concatenate([lo, hi - lo], axis=1) * mixed[:, None]
        lam = 1.0 - box[:, 2] * box[:, 3]
        return {
            self.partner_field: partner,
            self.lam_field: lam.astype(np.float32),
            "cutmix_box": box.astype(np.float32),
        }

    def mix(self, own: torch.Tensor, other: torch.Tensor, row: Mapping[str, np.ndarray]) -> torch.Tensor:
        x0, y0, w, h = box_row(row, "cutmix_box")
        if w == 0.0 or h == 0.0:
            return own
        steps = [round(v * self.grid) for v in (x0, x0 + w, y0, y0 + h)]
        mask = np.outer(coverage(steps[2], steps[3], own.shape[-2], self.grid),
                        coverage(steps[0], steps[1], own.shape[-1], self.grid))
        mask_t = torch.from_numpy(mask.astype(np.float32))
        return own * (1.0 - mask_t) + other * mask_t


def check_mixable(num_samples: int) -> None:
    """Mixing needs a partner other than the sample itself."""
    if num_samples < 2:
        raise InvalidSpec(
            f"mixing needs at least 2 samples, the dataset has {num_samples} — drop mixup/cutmix from the recipe"
        )
