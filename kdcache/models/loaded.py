"""A model with its weights, and what identifies and describes them: what every zoo loader returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from kdcache.models.preprocess import Preprocess

PRETRAINED = "pretrained"


@dataclass
class LoadedModel:
    """A model with weights, and what identifies and describes them."""

    module: nn.Module
    spec: str
    weights: str | None  # the file or folder read (not part of a cache id: where it lay)
    sha256: str
    num_classes: int
    tag: str | None = None  # the zoo reference, e.g. torchvision:IMAGENET1K_V1; None for a plain file
    preprocess: Preprocess | None = None  # None: the dataset's statistics
    classes: tuple[str, ...] | None = None  # the model's class names, where its weights say them

    def entry(self) -> dict[str, Any]:
        """The manifest's record of this member."""
        out: dict[str, Any] = {"spec": self.spec, "sha256": self.sha256, "weights": self.weights}
        if self.tag is not None:
            out["tag"] = self.tag
        return out
