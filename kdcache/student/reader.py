"""The student's reader: cache blocks become training batches, for kdcache's trainer or any loop.

:class:`TrainViews` reads the cache in chunk-sized blocks (one Zarr call per array per block, never one
per sample), shuffles within a window of blocks with whole-array permutations, and hands out ready-made
batches so that no per-sample Python runs outside the rendering of the images themselves.
:func:`loader` wraps it for a timm, Lightning or plain PyTorch loop: batches of
``{"input", "label", "teacher": {...}}``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache import data, distributed
from kdcache.models import preprocess
from kdcache.augment import Recipe
from kdcache.cache.store import Cache, open_cache
from kdcache.errors import CacheCorrupt
from kdcache.student.targets import CacheTargets
from kdcache.views import Renderer, ViewReplay, row


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


@dataclass(eq=False)
class Window:
    """Training views as parallel arrays, one row per view: what the reader decoded, before rendering.

    ``params`` and ``teacher`` map a field or cache array name to ``[M, *tail]``; ``partner`` is the
    mixing partner (-1 when unmixed) and ``lam`` the weight of the sample's own label.
    """

    index: np.ndarray
    view: np.ndarray
    params: dict[str, np.ndarray]
    teacher: dict[str, np.ndarray]
    partner: np.ndarray
    lam: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray | slice) -> Window:
        """The rows ``rows`` (a permutation, mask or slice) of every array."""
        return Window(
            self.index[rows], self.view[rows],
            {name: values[rows] for name, values in self.params.items()},
            {name: values[rows] for name, values in self.teacher.items()},
            self.partner[rows], self.lam[rows],
        )

    @staticmethod
    def concat(parts: Sequence[Window]) -> Window:
        """Rows of ``parts`` one after the other."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return Window(
            np.concatenate([p.index for p in parts]), np.concatenate([p.view for p in parts]),
            {name: np.concatenate([p.params[name] for p in parts]) for name in first.params},
            {name: np.concatenate([p.teacher[name] for p in parts]) for name in first.teacher},
            np.concatenate([p.partner for p in parts]), np.concatenate([p.lam for p in parts]),
        )


class TrainViews(IterableDataset):
    """Training views in chunk-aware order: whole blocks are read, then shuffled within a window.

    Items are dicts with ``input``, ``label``, ``index``, ``view``, mixing info (``partner_label``,
    ``lam``) and, when training from a cache, ``teacher/<array>`` rows. With ``batch_size`` the
    stream yields those dicts already collated, ``batch_size`` consecutive items at a time, exactly
    as ``DataLoader(batch_size=...)`` would collate the item stream (use it with
    ``DataLoader(batch_size=None)``); this skips per-item Python and per-item collation. With
    ``render=False`` the ``input`` entry is left out (for loops that replay views themselves, e.g.
    on the GPU). ``keep`` (boolean [N]) trains on a subset of samples while reading the cache exactly
    as the whole split would. ``len()`` is the number of views per epoch for this rank.

    The cache is opened lazily in each process (fsspec clients must not cross a fork). DataLoader
    workers take interleaved blocks, so reading and rendering scale with the worker count.
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
        batch_size: int | None = None,
        render: bool = True,
        keep: np.ndarray | None = None,
    ):
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
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
        self.batch_size = batch_size
        self.render = render
        self.keep = None if keep is None else np.asarray(keep, dtype=bool)
        if self.keep is not None and self.keep.shape != self.labels.shape:
            raise ValueError(f"keep must be a boolean mask of {len(self.labels)} samples, got shape {self.keep.shape}")
        # Shared memory, so that persistent DataLoader workers (which copied this object once) see
        # every set_epoch of the main process.
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._cache = None
        self._cache_pid = -1

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        blocks = plan_epoch(len(self.labels), self.block, self.views, self.seed, 0, self.rank, self.world)
        if self.keep is None:
            return sum(b.stop - b.start for b in blocks)
        return sum(int(self.keep[b.start : b.stop].sum()) for b in blocks)

    def num_batches(self) -> int:
        """Batches of ``batch_size`` views per epoch for this rank (the last may be short)."""
        if self.batch_size is None:
            raise ValueError("num_batches needs a stream made with batch_size")
        return -(-len(self) // self.batch_size)

    def num_rows(self) -> int:
        """Rows of the cache this stream reads: one per sample here (a subclass may read fewer)."""
        return len(self.labels)

    def __getstate__(self) -> dict[str, object]:
        state = {**self.__dict__, "_cache": None, "_cache_pid": -1}
        if get_spawning_popen() is None:  # a plain copy, not a worker being started: the epoch as it is now
            state["_epoch"] = self.epoch
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        if isinstance(state["_epoch"], int):
            state["_epoch"] = multiprocessing.Value("q", state["_epoch"], lock=False)
        self.__dict__.update(state)

    # ---- reading ----------------------------------------------------------------------------
    def _open(self) -> Cache:
        if self._cache is None or self._cache_pid != os.getpid():
            self._cache, self._cache_pid = open_cache(self.cache_path), os.getpid()
        return self._cache

    #: Where the arrays this stream reads lie in the cache, and the view number of its view 0.
    prefix = ""
    view_base = 0

    def _samples(self, block: Block) -> np.ndarray:
        """The sample indices of the rows ``block`` covers."""
        return np.arange(block.start, block.stop, dtype=np.int64)

    def _read(self, blocks: Sequence[Block]) -> Window:
        """The views of ``blocks``, block after block: cached params and teacher rows, or fresh params."""
        recipe = self.renderer.recipe
        aug = [f"aug/{name}" for name in recipe.fields()]
        if self.cache_path is None:
            stored: list[dict[str, np.ndarray] | None] = [None] * len(blocks)
        else:
            names = [self.prefix + name for name in (*aug, *self.teacher_arrays)]
            stored = self._open().read_blocks(names, [(b.start, b.stop, b.view) for b in blocks])
        parts = []
        for block, got in zip(blocks, stored):
            indices = self._samples(block)
            if got is None:
                params = recipe.sample(self.seed, indices, np.full_like(indices, block.view), len(self.labels))
                teacher: dict[str, np.ndarray] = {}
            else:
                params = {name.removeprefix("aug/"): got[self.prefix + name] for name in aug}
                teacher = {name: got[self.prefix + name] for name in self.teacher_arrays}
                self._check_params(recipe, params, block)
            partner, lam = recipe.mixing(params) if params else (np.full(len(indices), -1), np.ones(len(indices)))
            parts.append(Window(indices, np.full(len(indices), self.view_base + block.view, dtype=np.int64), params,
                                teacher, np.asarray(partner, dtype=np.int64), np.asarray(lam, dtype=np.float32)))
        return Window.concat(parts)

    def _check_params(self, recipe: Recipe, params: dict[str, np.ndarray], block: Block) -> None:
        """CacheCorrupt where a block's stored params hold values no op writes (a shared cache is untrusted:
        they would crash, hang or silently change the replay)."""
        why = recipe.stored_problem(params, len(self.labels))
        if why is not None:
            raise CacheCorrupt(f"cache {self.cache_path}: samples {block.start}..{block.stop - 1}, view {block.view}: "
                               f"{why} — no op writes that; the cache is damaged or forged, precompute or import it "
                               "again")

    def windows(self) -> Iterator[Window]:
        """This process's views of the epoch as shuffled windows: the reading path without rendering."""
        blocks = plan_epoch(self.num_rows(), self.block, self.views, self.seed, self.epoch, self.rank, self.world)
        info = get_worker_info()
        if info is not None:
            blocks = blocks[info.id :: info.num_workers]
        images = self.renderer.images if self.render else None
        for w in range(0, len(blocks), self.window):
            if images is not None:  # a remote source fetches this window's and the next one's images ahead
                ahead = [blocks[w + self.window : w + 2 * self.window]]
                for group in ([blocks[: self.window]] if w == 0 else []) + ahead:
                    if group:
                        images.prefetch_ahead(np.concatenate([np.arange(b.start, b.stop) for b in group]))
            window = self._read(blocks[w : w + self.window])
            window = window.take(np.random.default_rng([self.seed, self.epoch, w, 0x77]).permutation(len(window)))
            if self.keep is not None:
                window = window.take(self.keep[window.index])
            if len(window):
                yield window

    # ---- handing out ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, object]]:
        if self.batch_size is not None:
            return self._batches()
        return self._items()

    def _batches(self) -> Iterator[dict[str, object]]:
        return (self.collate(part) for part in rebatch(self.windows(), self.batch_size))

    def _items(self) -> Iterator[dict[str, object]]:
        for window in self.windows():
            labels = self.labels[window.index]
            partner_labels = np.where(window.partner >= 0, self.labels[np.maximum(window.partner, 0)], labels)
            teacher = {f"teacher/{name}": torch.from_numpy(values) for name, values in window.teacher.items()}
            columns = zip(window.index.tolist(), window.view.tolist(), labels.tolist(),
                          partner_labels.tolist(), window.lam.tolist())
            for k, (index, view, label, partner_label, lam) in enumerate(columns):
                item: dict[str, object] = {}
                if self.render:
                    item["input"] = self.renderer(index, row(window.params, k))
                item |= {"label": label, "index": index, "view": view, "partner_label": partner_label, "lam": lam}
                for key, values in teacher.items():
                    item[key] = values[k]
                yield item

    def collate(self, window: Window) -> dict[str, torch.Tensor]:
        """One batch of the views of ``window``, as ``default_collate`` would make it from their items."""
        labels = self.labels[window.index]
        partner_labels = np.where(window.partner >= 0, self.labels[np.maximum(window.partner, 0)], labels)
        batch: dict[str, torch.Tensor] = {}
        if self.render:
            batch["input"] = self.renderer.batch(window.index, window.params)
        batch |= {
            "label": torch.from_numpy(labels),
            "index": torch.from_numpy(window.index.astype(np.int64)),
            "view": torch.from_numpy(window.view.astype(np.int64)),
            "partner_label": torch.from_numpy(partner_labels),
            "lam": torch.from_numpy(window.lam.astype(np.float64)),  # default_collate makes Python floats float64
        }
        for name, values in window.teacher.items():
            batch[f"teacher/{name}"] = torch.from_numpy(np.ascontiguousarray(values))
        return batch


def rebatch(windows: Iterator[Window], size: int) -> Iterator[Window]:
    """Consecutive rows of ``windows`` regrouped into windows of ``size`` rows (the last may be short)."""
    pending: list[Window] = []
    count = 0
    for window in windows:
        start = 0
        while start < len(window):
            part = window.take(slice(start, start + size - count))
            pending.append(part)
            count += len(part)
            start += len(part)
            if count == size:
                yield Window.concat(pending)
                pending, count = [], 0
    if pending:
        yield Window.concat(pending)


class TeacherViews(TrainViews):
    """:class:`TrainViews` whose batches carry the teacher's side decoded, under ``"teacher"``."""

    def __init__(self, *args: Any, targets: CacheTargets, **kwargs: Any):
        super().__init__(*args, teacher_arrays=targets.arrays(), **kwargs)
        self.targets = targets

    def collate(self, window: Window) -> dict[str, Any]:
        batch = super().collate(window)
        batch["teacher"] = self.targets.decode(batch)
        for name in self.teacher_arrays:
            del batch[f"teacher/{name}"]
        return batch


def loader(
    cache: str | Cache, dataset: str, *, size: int | None = None, batch_size: int = 128, rank: int | None = None,
    world: int | None = None, workers: int = 0, energy: bool = False, features: Sequence[str] = (),
    pin_memory: bool = False, norm: str | None = None, interpolation: str | None = None,
    allow_version_drift: bool = False,
) -> DataLoader:
    """A DataLoader over one epoch of a cache's views, for any training loop.

    Each batch is ``{"input": float32 [B, C, S, S], "label": int64 [B], "teacher": {...}, "index", "view",
    "partner_label", "lam"}``; ``teacher`` holds ``logits`` (float32, dense caches) or ``probs`` (float32,
    densified, sparse caches), ``energy`` [B, nT] with ``energy=True``, and ``features[layer]`` for each
    cached layer named in ``features``. Inputs are the cache's recorded views replayed at ``size`` (default:
    the teacher's input size: the teacher's very pixels) with ``interpolation`` (default: the teacher's,
    kdcache.views.ViewReplay), normalised with ``norm`` (kdcache.preprocess presets or M,M,M/S,S,S; default:
    the dataset's statistics); ``allow_version_drift`` replays a ``timm:`` recipe under other package versions
    than it recorded (a warning; refused in one line otherwise, before any worker starts). Each rank of ``world`` (default:
    this process's, see kdcache.distributed) reads its own blocks. Call ``loader.dataset.set_epoch(e)``
    before epoch ``e``, as with a ``DistributedSampler``: each epoch replays another stored view per sample.
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    source = data.open_source(dataset)
    cache.check_dataset(source.spec, source.fingerprint, source.num_classes, len(source.train), source.parts)
    cache.check_readable()
    own_rank, own_world = distributed.rank_world()
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"], allow_version_drift)
    recipe.check_versions()
    recipe.check_pillow(cache.manifest.get("provenance", {}).get("pillow"))
    views = ViewReplay.of(cache.manifest["recipe"], size, interpolation)
    recipe.check_size(views.size)
    pre = preprocess.resolve(None, source.mean, source.std, source.channels, views.size, norm)
    renderer = views.renderer(source.train.bound(cache.input_checksums(), cache.path), recipe, pre.mean, pre.std)
    stream = TeacherViews(renderer, source.train.labels, cache.chunk_samples, int(cache.manifest["recipe"]["seed"]),
                          cache.path, views=cache.views, rank=own_rank if rank is None else rank,
                          world=own_world if world is None else world, batch_size=batch_size,
                          targets=CacheTargets(cache, energy=energy, layers=features))
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)
