"""Views: the single place where a sample and its recorded params become a model input.

Precompute and training both call :class:`Renderer`, so the tensor a student trains on for
(sample i, view v) is produced by the same code from the same stored numbers as the tensor the
teacher saw: that is what makes the cache faithful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from kdcache.augment import Recipe, resize_view
from kdcache.data import ImageSet


@dataclass
class Renderer:
    """Turns (sample index, params of one view) into a normalised float32 model input [C, size, size]."""

    images: ImageSet
    recipe: Recipe
    size: int
    mean: Sequence[float]
    std: Sequence[float]

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def _image(self, index: int) -> torch.Tensor:
        return self.images[index][0]

    def normalise(self, view: torch.Tensor) -> torch.Tensor:
        return (view - self._mean) / self._std

    def __call__(self, index: int, params: Mapping[str, np.ndarray]) -> torch.Tensor:
        view = self.recipe.apply(self._image(index), params, self.size, partner=self._image)
        return self.normalise(view)

    def plain(self, index: int) -> torch.Tensor:
        """The un-augmented evaluation view of a sample."""
        return self.normalise(resize_view(self._image(index), self.size))


def row(params: Mapping[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
    """Params of element ``j`` of a batch of params."""
    return {name: values[j] for name, values in params.items()}


class EvalViews(Dataset):
    """Un-augmented views of a split, for evaluation: (input, label)."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer

    def __len__(self) -> int:
        return len(self.renderer.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.renderer.plain(index), int(self.renderer.images.labels[index])


@dataclass(frozen=True)
class Block:
    """Samples ``start..stop-1`` seen through view ``view`` in one epoch."""

    start: int
    stop: int
    view: int


def plan_epoch(
    num_samples: int, block: int, views: int | None, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[Block]:
    """The blocks of one epoch, in shuffled order, for one rank.

    With a cache of ``views`` views, each block of samples takes one view per epoch, cycling through
    a per-block permutation so that every stored view is used once every ``views`` epochs. Without a
    cache (``views=None``) epoch e uses view index e: fresh params every epoch.
    """
    starts = np.arange(0, num_samples, block)
    rng = np.random.default_rng([seed, epoch, 0x6B64])
    order = rng.permutation(len(starts))
    blocks = []
    for b in order:
        if views is None:
            view = epoch
        else:
            cycle = np.random.default_rng([seed, int(b), epoch // views, 0x7669]).permutation(views)
            view = int(cycle[epoch % views])
        start = int(starts[b])
        blocks.append(Block(start, min(start + block, num_samples), view))
    return blocks[rank::world]


class TrainViews(IterableDataset):
    """Training items in chunk-aware order: whole blocks are read, then shuffled within a window.

    Each item is a dict with ``input``, ``label``, ``index``, ``view``, mixing info (``partner_label``,
    ``lam``) and, when training from a cache, ``teacher/<array>`` rows. The cache is opened lazily in
    each DataLoader worker (fsspec clients must not cross a fork).
    """

    def __init__(
        self,
        renderer: Renderer,
        labels: np.ndarray,
        block: int,
        seed: int,
        cache_path: str | None = None,
        teacher_arrays: Sequence[str] = (),
        views: int | None = None,
        window: int = 4,
        rank: int = 0,
        world: int = 1,
    ):
        self.renderer = renderer
        self.labels = np.asarray(labels, dtype=np.int64)
        self.block = block
        self.seed = seed
        self.cache_path = cache_path
        self.teacher_arrays = list(teacher_arrays)
        self.views = views
        self.window = window
        self.rank = rank
        self.world = world
        self.epoch = 0
        self._cache = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        blocks = plan_epoch(len(self.labels), self.block, self.views, self.seed, 0, self.rank, self.world)
        return sum(b.stop - b.start for b in blocks)

    def _read(self, block: Block) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        indices = np.arange(block.start, block.stop, dtype=np.int64)
        if self.cache_path is None:
            views = np.full_like(indices, block.view)
            return self.renderer.recipe.sample(self.seed, indices, views, len(self.labels)), {}
        if self._cache is None:
            from kdcache.store import open_cache

            self._cache = open_cache(self.cache_path)
        aug = [f"aug/{name}" for name in self.renderer.recipe.fields()]
        data = self._cache.read_block([*aug, *self.teacher_arrays], block.start, block.stop, block.view)
        params = {name.removeprefix("aug/"): data[name] for name in aug}
        return params, {name: data[name] for name in self.teacher_arrays}

    def __iter__(self) -> Iterator[dict[str, object]]:
        blocks = plan_epoch(len(self.labels), self.block, self.views, self.seed, self.epoch, self.rank, self.world)
        info = get_worker_info()
        if info is not None:
            blocks = blocks[info.id :: info.num_workers]
        for w in range(0, len(blocks), self.window):
            window = blocks[w : w + self.window]
            items: list[tuple[int, int, dict[str, np.ndarray], dict[str, np.ndarray], int, float]] = []
            for block in window:
                params, teacher = self._read(block)
                partners, lams = self.renderer.recipe.mixing(params)
                for j in range(block.stop - block.start):
                    items.append((block.start + j, block.view, row(params, j), row(teacher, j),
                                  int(partners[j]), float(lams[j])))
            order = np.random.default_rng([self.seed, self.epoch, w, 0x77]).permutation(len(items))
            for k in order:
                index, view, params, teacher, partner, lam = items[k]
                label = int(self.labels[index])
                item: dict[str, object] = {
                    "input": self.renderer(index, params),
                    "label": label,
                    "index": index,
                    "view": view,
                    "partner_label": int(self.labels[partner]) if partner >= 0 else label,
                    "lam": lam,
                }
                for name, value in teacher.items():
                    item[f"teacher/{name}"] = torch.from_numpy(np.ascontiguousarray(value))
                yield item
