"""Classic online KD: the teacher runs a forward pass on every student batch.

This is the baseline a cache is measured against. The trainer feeds the teacher the very inputs
the student sees (replayed from a cache's recorded views, or sampled live from the seed), so a
float32 cache and the online teacher give the same loss up to float rounding.
"""

from __future__ import annotations

import os

import torch

from kdcache import data
from kdcache.models.class_maps import apply_class_map, check_classes, read_class_map
from kdcache.errors import InvalidSpec, MissingData
from kdcache.models.preprocess import Preprocess
from kdcache.models import is_zoo_reference, load_model

#: What an online teacher offers, in the vocabulary of ``Loss.check``.
ONLINE_INPUTS = frozenset({"logits", "probs"})


class OnlineTeacher:
    """A frozen teacher in eval mode; calling it returns its float32 logits for a batch of student inputs.

    A teacher with its own preprocessing (zoo weights, see kdcache/models/preprocess.py) gets the student's
    view re-normalised with its statistics and, at another input size, resized on the device.
    """

    def __init__(self, spec: str, weights: str | None, source: data.Source, device: torch.device,
                 student: Preprocess | None = None, class_map: str | None = None):
        if not weights and not is_zoo_reference(spec, weights):
            raise InvalidSpec(f"--online-teacher {spec} needs --weights FILE (the teacher's state dict), "
                              "torchvision:TAG or pretrained")
        if weights and not is_zoo_reference(spec, weights) and not os.path.isfile(weights):
            raise MissingData(f"weights file {weights} not found — check the path given to --weights")
        # Building a model draws initial weights from the global RNG; fork it so that adding a
        # teacher does not change the student's batches or any later random draw.
        with torch.random.fork_rng(devices=[]):
            loaded = load_model(spec, weights, source.num_classes, source.channels)
        if class_map is not None:
            indices = read_class_map(class_map, source.classes, loaded.classes, loaded.num_classes)
            apply_class_map(loaded.module, indices)
        else:
            check_classes(spec, loaded.num_classes, source.num_classes, has_map=False)
        self.spec = spec
        self.sha256 = loaded.sha256
        self.model = loaded.module.to(device).eval().requires_grad_(False)
        own = loaded.preprocess  # None: the teacher takes the student's inputs as they are
        self.preprocess = own.at(own.size or student.size) if own is not None and student is not None else None
        self._student = student
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's input for student inputs ``x`` (``x`` itself when they preprocess alike)."""
        mine, theirs = self.preprocess, self._student
        if mine is None or theirs is None or (mine.mean, mine.std, mine.size) == (theirs.mean, theirs.std, theirs.size):
            return x
        if self._shift is None:
            to = dict(device=x.device, dtype=x.dtype)
            s_mean, s_std = (torch.tensor(v, **to).view(1, -1, 1, 1) for v in (theirs.mean, theirs.std))
            t_mean, t_std = (torch.tensor(v, **to).view(1, -1, 1, 1) for v in (mine.mean, mine.std))
            self._shift = (s_std / t_std, (s_mean - t_mean) / t_std)
        scale, offset = self._shift
        x = x * scale + offset
        if mine.size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(mine.size, mine.size), mode=mine.interpolation,
                                                antialias=mine.interpolation != "nearest", align_corners=False
                                                if mine.interpolation != "nearest" else None)
        return x

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(self.inputs(inputs)).float()
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
