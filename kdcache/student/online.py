"""Classic online KD: the teacher runs a forward pass on every student batch.

This is the baseline a cache is measured against. The trainer feeds the teacher the very inputs
the student sees (replayed from a cache's recorded views, or sampled live from the seed), so a
float32 cache and the online teacher give the same loss up to float rounding.
"""

from __future__ import annotations

import os

import torch

from kdcache import models
from kdcache.errors import InvalidSpec, MissingData

#: What an online teacher offers, in the vocabulary of ``Loss.check``.
ONLINE_INPUTS = frozenset({"logits", "probs"})


class OnlineTeacher:
    """A frozen teacher in eval mode; calling it returns its float32 logits for a batch of inputs."""

    def __init__(self, spec: str, weights: str | None, num_classes: int, channels: int, device: torch.device):
        if not weights:
            raise InvalidSpec(f"--online-teacher {spec} needs --weights FILE (the teacher's state dict)")
        if not os.path.isfile(weights):
            raise MissingData(f"weights file {weights} not found — check the path given to --weights")
        # Building a model draws initial weights from the global RNG; fork it so that adding a
        # teacher does not change the student's batches or any later random draw.
        with torch.random.fork_rng(devices=[]):
            model = models.create_model(spec, num_classes, channels)
        models.load_weights(model, weights, spec=spec)
        self.spec = spec
        self.sha256 = models.file_sha256(weights)
        self.model = model.to(device).eval().requires_grad_(False)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(inputs).float()
        # An inference tensor cannot be saved for the loss's backward pass; a clone made outside
        # inference mode is an ordinary tensor.
        return logits.clone()


def check_online(loss: str, needs: frozenset[str]) -> None:
    """Refuse, in one line, a loss that needs more from the teacher than its logits."""
    missing = sorted(needs - ONLINE_INPUTS)
    if missing:
        raise InvalidSpec(
            f"loss {loss} needs {', '.join(missing)} of the teacher, which --online-teacher does not provide "
            "(logits only) — train from a cache made with those outputs instead"
        )
