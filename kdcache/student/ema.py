"""An exponential moving average of the student's weights (``train --ema DECAY``), as timm's ModelEmaV2
and the reinforced-dataset recipes keep one: evaluated and saved beside the raw weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``module`` starts as a copy of the model; after each optimiser step :meth:`update` sets every
    parameter to ``decay * ema + (1 - decay) * current`` and copies the buffers (BatchNorm statistics)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, current in zip(self.module.parameters(), model.parameters(), strict=True):
            ema.lerp_(current.detach(), 1 - self.decay)
        for ema, current in zip(self.module.buffers(), model.buffers(), strict=True):
            ema.copy_(current)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
