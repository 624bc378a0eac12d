"""Views: the single place where a sample and its recorded params become a model input.

Precompute and training both call :class:`Renderer`, so the tensor a student trains on for
(sample i, view v) is produced by the same code from the same stored numbers as the tensor the
teacher saw: that is what makes the cache faithful.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.augment import Recipe
from kdcache.data.images import ImageSet
from kdcache.models.preprocess import DEFAULT_CROP_PCT, Preprocess, eval_view

#: How a view's image is decoded: ``full`` size, or ``reduced``: a JPEG at the smallest M/8 of its size
#: at which the view's crop still has the output's side in pixels (a recorded recipe option).
DECODES = ("full", "reduced")


def recorded_decode(recipe: Mapping[str, object]) -> str:
    """The decode a cache's ``recipe`` section records (caches without one decode at full size)."""
    return str(recipe.get("decode", "full"))


@dataclass(frozen=True)
class ViewReplay:
    """How a reader renders a cache's recorded views: the student's loader and trainer, the Python
    ``loader`` and ``verify --recompute`` all go through it, so a renderer that drifts on one side fails
    verification.

    At the teacher's size it is the teacher's view: the same crop, interpolation, antialiasing and
    decode. At another ``size`` it resizes the same crop with the recorded interpolation, unless the
    reader names its own. Normalisation is each model's own and is not part of it.
    """

    size: int
    interpolation: str
    decode: str
    teacher_size: int
    teacher_interpolation: str

    @classmethod
    def of(cls, recipe: Mapping[str, object], size: int | None = None, interpolation: str | None = None) -> ViewReplay:
        """The replay of the views a cache's ``recipe`` section records, at ``size`` with ``interpolation``
        (default: the teacher's)."""
        teacher = Preprocess.from_manifest(recipe)
        chosen = Preprocess(teacher.mean, teacher.std, teacher.size, interpolation or teacher.interpolation)
        return cls(int(size or teacher.size), chosen.interpolation, recorded_decode(recipe), int(teacher.size),
                   teacher.interpolation)

    @property
    def equals_teacher(self) -> bool:
        """True when every pixel is the one the teacher saw (before each model's normalisation)."""
        return self.size == self.teacher_size and self.interpolation == self.teacher_interpolation

    def describe(self) -> str:
        """One line for ``train``'s start: what the student renders and whether it is the teacher's view."""
        what = f"{self.size} px, {self.interpolation}, {self.decode} decode"
        if self.equals_teacher:
            return f"views: the teacher's own ({what})"
        return (f"views: the teacher's crops at {what} — not the teacher's pixels (it rendered "
                f"{self.teacher_size} px, {self.teacher_interpolation})")

    def to_record(self) -> dict[str, object]:
        """run.json's ``views``."""
        return {"size": self.size, "interpolation": self.interpolation, "decode": self.decode,
                "equals_teacher": self.equals_teacher}

    def renderer(self, images: ImageSet, recipe: Recipe, mean: Sequence[float], std: Sequence[float],
                 crop_pct: float = DEFAULT_CROP_PCT) -> Renderer:
        """The renderer of these views, normalised with ``mean`` and ``std``."""
        return Renderer(images, recipe, self.size, mean, std, self.interpolation, crop_pct, self.decode)


def reduction(width: int, height: int, box: Sequence[float], size: int) -> tuple[int, int]:
    """The smallest (width, height) a decode of a width x height image may have so that the crop ``box``
    (normalised) keeps ``size`` pixels on both sides: the view is then a downscale still."""
    return (min(width, math.ceil(size / max(box[2], 1e-9))), min(height, math.ceil(size / max(box[3], 1e-9))))


@dataclass
class Renderer:
    """Turns (sample index, params of one view) into a normalised float32 model input [C, size, size].

    Teacher and student each have one, with their own size, interpolation and statistics
    (kdcache/models/preprocess.py): the stored params are shared, the pixels each model sees are its own.
    """

    images: ImageSet
    recipe: Recipe
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT
    decode: str = "full"  # see DECODES

    @classmethod
    def for_model(cls, images: ImageSet, recipe: Recipe, pre: Preprocess, decode: str = "full") -> Renderer:
        """The renderer of a model whose preprocessing is ``pre`` (its size set)."""
        return cls(images, recipe, int(pre.size), pre.mean, pre.std, pre.interpolation, pre.crop_pct, decode)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(tuple(self.mean), tuple(self.std), self.size, self.interpolation, self.crop_pct)

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def _image(self, index: int) -> torch.Tensor:
        return self.images[index][0]

    def _view_image(self, index: int, params: Mapping[str, np.ndarray]) -> torch.Tensor:
        """The image one view starts from: at full size, or with ``reduced`` decode as small as its crop allows."""
        box = self.recipe.source_box(params) if self.decode == "reduced" else None
        if box is None:
            return self._image(index)
        return self.images.load(index, lambda width, height: reduction(width, height, box, self.size))

    def normalise(self, view: torch.Tensor) -> torch.Tensor:
        return (view - self._mean) / self._std

    def __call__(self, index: int, params: Mapping[str, np.ndarray]) -> torch.Tensor:
        view = self.recipe.apply(self._view_image(index, params), params, self.size, partner=self._image,
                                 interpolation=self.interpolation)
        return self.normalise(view)

    def batch(self, indices: Sequence[int] | np.ndarray, params: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Inputs [B, C, size, size] of views ``(indices[j], row j of params)``, equal to stacking ``self(...)``.

        Each view is replayed into one preallocated tensor and the batch is normalised in place at
        once (the same element-wise IEEE operations as :meth:`normalise`, so the same bits).
        """
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("Renderer.batch needs at least one view")
        self.images.prefetch(indices)
        out: torch.Tensor | None = None
        for j, index in enumerate(indices):
            view_params = row(params, j)
            view = self.recipe.apply(self._view_image(index, view_params), view_params, self.size,
                                     partner=self._image, interpolation=self.interpolation)
            if out is None:
                out = torch.empty((len(indices), *view.shape), dtype=view.dtype)
            out[j] = view
        return out.sub_(self._mean).div_(self._std)

    def plain(self, index: int) -> torch.Tensor:
        """The un-augmented evaluation view of a sample (resize shorter side + center crop, see
        kdcache.preprocess.eval_view)."""
        return eval_view(self._image(index), self.preprocess)


def row(params: Mapping[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
    """Params of element ``j`` of a batch of params."""
    return {name: values[j] for name, values in params.items()}
