"""The energy-guided extra views as a second training stream (``train --extra-views``).

Precompute (``--extra-views R:K2``) stores K2 extra mixed views of the highest-energy samples under
``he/`` (kdcache/cache/view_sets.py). Each epoch adds one of them per chosen sample, cycling through the
K2, read and batched as the regular views are, with no teacher; their batches are interleaved with the
regular ones in proportion to the two streams' lengths.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from kdcache.cache.store import Cache
from kdcache.cache.view_sets import EXTRA_PREFIX, EXTRA_VIEW_BASE, extra_views
from kdcache.data import ImageSet
from kdcache.errors import CacheMismatch, InvalidSpec
from kdcache.models.preprocess import Preprocess
from kdcache.student.reader import Block, TrainViews, plan_epoch
from kdcache.views import Renderer, recorded_decode


class ExtraViews(TrainViews):
    """The extra views of a cache, one per chosen sample per epoch (cycling through the K2), read and
    batched like :class:`TrainViews` reads the regular ones. Teacher arrays keep their plain names, so
    the loss sees them exactly as regular views."""

    prefix, view_base = EXTRA_PREFIX, EXTRA_VIEW_BASE

    def __init__(self, renderer: Renderer, labels: np.ndarray, samples: np.ndarray, block: int, seed: int,
                 cache_path: str, teacher_arrays: list[str], views: int, batch_size: int,
                 keep: np.ndarray | None = None, rank: int = 0, world: int = 1):
        super().__init__(renderer, labels, block, seed, cache_path, teacher_arrays, views, rank=rank, world=world,
                         batch_size=batch_size, keep=keep)
        self.samples = np.asarray(samples, dtype=np.int64)

    def num_rows(self) -> int:
        return len(self.samples)

    def __len__(self) -> int:
        blocks = plan_epoch(len(self.samples), self.block, self.views, self.seed, 0, self.rank, self.world)
        if self.keep is None:
            return sum(b.stop - b.start for b in blocks)
        return sum(int(self.keep[self.samples[b.start : b.stop]].sum()) for b in blocks)

    def _samples(self, block: Block) -> np.ndarray:
        return self.samples[block.start : block.stop]


class Interleaved(IterableDataset):
    """Batches of two batch-yielding streams, interleaved in proportion to their lengths."""

    def __init__(self, first: TrainViews, second: TrainViews):
        self.first, self.second = first, second

    def set_epoch(self, epoch: int) -> None:
        self.first.set_epoch(epoch)
        self.second.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def num_batches(self) -> int:
        """Batches per epoch: each stream's own, as they are not merged into shared batches."""
        return self.first.num_batches() + self.second.num_batches()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        streams = [iter(self.first), iter(self.second)]
        sizes = [max(1, s.num_batches()) for s in (self.first, self.second)]
        sent = [0, 0]
        while streams[0] is not None or streams[1] is not None:
            live = [k for k in (0, 1) if streams[k] is not None]
            k = min(live, key=lambda k: ((sent[k] + 1) / sizes[k], k))
            try:
                yield next(streams[k])
                sent[k] += 1
            except StopIteration:
                streams[k] = None


def with_extra_views(stream: TrainViews, cache: Cache | None, images: ImageSet, pre: Preprocess,
                     allow_version_drift: bool = False) -> Interleaved:
    """``stream`` plus the cache's extra views (``train --extra-views``), rendered with the student's
    preprocessing ``pre``; a one-line error when there are none (``allow_version_drift``: Recipe.from_manifest)."""
    if cache is None:
        raise InvalidSpec("--extra-views trains on the extra views a cache stores — pass --cache PATH")
    found = extra_views(cache, allow_version_drift)
    if found is None:
        raise CacheMismatch(f"cache {cache.path} has no energy-guided extra views — precompute it with "
                            "--extra-views 0.5:4, or train without --extra-views")
    renderer = Renderer.for_model(images, found.recipe, pre, recorded_decode(cache.manifest["recipe"]))
    extra = ExtraViews(renderer, stream.labels, found.samples, found.chunk_samples, stream.seed, stream.cache_path,
                       stream.teacher_arrays, found.views, stream.batch_size, stream.keep, stream.rank, stream.world)
    return Interleaved(stream, extra)
