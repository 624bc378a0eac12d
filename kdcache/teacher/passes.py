"""The one teacher pass: render views, run the teacher, extract what the cache stores, write shards.

Every stage-1 writer (precompute; extend's views, features and members; the extra views) and both
readers that rerun the teacher (``precompute --dry-run``'s warm-up, ``verify --recompute``) go
through :func:`run_teacher`. Views are rendered in DataLoader workers or, without workers, on a
prefetch thread, so rendering overlaps the teacher's forward; :func:`run_shards` gathers the outputs
into whole shards and :class:`ShardWriter` writes each on a background thread while the teacher
computes the next.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from kdcache.cache.digests import INPUTS
from kdcache.cache.store import Cache
from kdcache.runtime import AUTOCAST, HostCopier, prefetched
from kdcache.teacher.ensemble import Ensemble
from kdcache.teacher.outputs import FeatureCapture, batch_outputs, class_uniforms
from kdcache.views import Renderer

#: ``forward(inputs on the device, batch) -> (float32 logits, members' float32 logits)``
Forward = Callable[[torch.Tensor, "ViewBatch"], tuple[torch.Tensor, Sequence[torch.Tensor]]]


@dataclass(frozen=True)
class ViewBatch:
    """Views ``(samples[j], views[j])`` run in one forward pass. ``views`` are the view indices the params
    are sampled at; ``params``, when given, are replayed instead of sampled. ``tag`` is the caller's."""

    samples: np.ndarray
    views: np.ndarray
    params: dict[str, np.ndarray] | None = None
    tag: Any = None


@dataclass
class PassOutput:
    """One batch of the pass: its host inputs, the teacher's float32 logits (and members' logits, for an
    ensemble) on the device, and every per-view array the cache stores for it."""

    batch: ViewBatch
    inputs: torch.Tensor
    logits: torch.Tensor
    members: Sequence[torch.Tensor]
    arrays: dict[str, np.ndarray] = field(repr=False)


class _Rendered(Dataset):
    """Batch ``k``: its index, params, class-draw uniforms and rendered inputs.

    Params and uniforms are drawn where the batch is rendered (a worker, or the prefetch thread): both
    are pure functions of (seed, i, v), so this equals drawing them in the main process.
    """

    def __init__(self, renderer: Renderer, seed: int, num_samples: int, batches: Sequence[ViewBatch], draws: int):
        self.renderer, self.seed, self.num_samples, self.batches, self.draws = renderer, seed, num_samples, batches, draws

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[int, dict[str, np.ndarray], np.ndarray | None, torch.Tensor,
                                           np.ndarray | None]:
        b = self.batches[k]
        params = b.params if b.params is not None else self.renderer.recipe.sample(self.seed, b.samples, b.views,
                                                                                    self.num_samples)
        uniforms = class_uniforms(self.seed, b.samples, b.views, self.draws) if self.draws else None
        info = get_worker_info()  # this process renders every num_workers-th batch
        following = k + (info.num_workers if info is not None else 1)
        if following < len(self.batches):  # a remote source fetches it while this one renders
            self.renderer.images.prefetch_ahead(self.batches[following].samples)
        inputs = self.renderer.batch(b.samples, params)
        images = self.renderer.images  # a recording set kept the crc32c of each image it read (precompute)
        return k, params, uniforms, inputs, images.checksums(b.samples) if images.seen is not None else None


def _as_is(batch: Any) -> Any:
    """The loader's collate: params stay numpy arrays (the default would make them tensors)."""
    return batch


def run_teacher(
    teacher: torch.nn.Module, renderer: Renderer, batches: Sequence[ViewBatch], outputs: dict[str, Any], *, seed: int,
    num_samples: int, device: torch.device, workers: int = 0, forward: Forward | None = None, reuse_maps: bool = False,
    progress: bool = False, desc: str = "teacher", on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Iterator[PassOutput]:
    """Run ``teacher`` over ``batches`` in order, yielding what the cache stores for each.

    ``outputs`` is the manifest's outputs section (what to extract). ``forward`` replaces the teacher
    call (extend's new members recombine with stored ones). With ``reuse_maps`` the caller promises to
    copy a batch's arrays before asking for the next, and full feature maps reuse their memory.
    ``on_batch(inputs, logits)`` sees every batch (tests, custom logging).
    """
    logit_entry = outputs["logits"]
    draws = logit_entry["draws"] if logit_entry["mode"] == "sampled" else 0
    loader = DataLoader(_Rendered(renderer, seed, num_samples, batches, draws), batch_size=None,
                        num_workers=workers, pin_memory=device.type == "cuda", collate_fn=_as_is)
    capture = FeatureCapture(teacher, {f["layer"]: f["mode"] for f in outputs.get("features", [])})
    autocast_dtype = AUTOCAST[outputs.get("precision", "fp32")]  # the teacher's forward precision
    copier = HostCopier()
    total = sum(len(b.samples) for b in batches)
    try:
        with torch.inference_mode(), tqdm(total=total, unit="view", desc=desc, disable=not progress,
                                          dynamic_ncols=True) as bar:
            for k, params, uniforms, inputs, checksums in (prefetched(loader) if workers == 0 else loader):
                x = inputs.to(device, non_blocking=True)
                if device.type == "cuda" and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)  # convolution kernels' preferred layout
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    if forward is None:
                        logits = teacher(x)
                        members = teacher.last if isinstance(teacher, Ensemble) else []
                    else:
                        logits, members = forward(x, batches[k])
                logits, members = logits.float(), [m.float() for m in members]  # outputs from float32 logits
                if on_batch is not None:
                    on_batch(inputs, logits)
                if uniforms is not None:
                    uniforms = torch.as_tensor(uniforms).to(device)
                arrays = batch_outputs(capture, logits, outputs, uniforms, params, members, copier)
                if checksums is not None:
                    arrays[INPUTS] = checksums
                yield PassOutput(batches[k], inputs, logits, members, arrays)
                if reuse_maps:
                    capture.give_back()
                bar.update(len(inputs))
    finally:
        capture.close()


def compiled_forward(teacher: torch.nn.Module) -> Forward:
    """A ``forward`` for :func:`run_teacher` running ``torch.compile(teacher)``; hooks (feature capture)
    stay on the teacher's own modules, which the compiled graph calls."""
    compiled = torch.compile(teacher)

    def forward(x: torch.Tensor, batch: ViewBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return compiled(x), (teacher.last if isinstance(teacher, Ensemble) else [])

    return forward


@dataclass(frozen=True)
class Shard:
    """Rows ``first .. first + len(samples) - 1`` of a view family, written together: row r holds sample
    ``samples[r]`` and its views ``views`` (indices as sampled)."""

    key: int
    first: int
    samples: np.ndarray
    views: np.ndarray

    @property
    def size(self) -> int:
        """Views in the shard."""
        return len(self.samples) * len(self.views)


def cache_shards(cache: Cache, views: np.ndarray, numbers: Iterable[int] | None = None) -> list[Shard]:
    """Shards ``numbers`` (default: all) of the cache's regular views, each with the views ``views``."""
    shards = []
    for s in range(cache.num_shards) if numbers is None else numbers:
        start, stop = cache.shard_range(s)
        shards.append(Shard(s, start, np.arange(start, stop, dtype=np.int64), views))
    return shards


def shard_batches(shards: Sequence[Shard], batch_size: int) -> list[ViewBatch]:
    """The batches of every shard in row-major (sample, then view) order; no batch spans two shards."""
    batches = []
    for shard in shards:
        width = len(shard.views)
        for lo in range(0, shard.size, batch_size):
            pairs = np.arange(lo, min(lo + batch_size, shard.size), dtype=np.int64)
            batches.append(ViewBatch(shard.samples[pairs // width], shard.views[pairs % width], tag=(shard, lo)))
    return batches


def run_shards(
    teacher: torch.nn.Module, renderer: Renderer, shards: Sequence[Shard], outputs: dict[str, Any],
    write: Callable[[Shard, dict[str, np.ndarray]], None], *, batch_size: int,
    before_write: Callable[[], None] | None = None, **pass_options: Any,
) -> int:
    """Run the teacher over every view of ``shards``; hand each complete shard's arrays ``[rows, views, ...]``
    to ``write`` on the background writer (``before_write`` runs first, on this thread). Returns the views
    computed. ``pass_options`` go to :func:`run_teacher`."""
    writer = ShardWriter(write)
    filling: dict[int, tuple[dict[str, np.ndarray], int]] = {}
    try:
        for out in run_teacher(teacher, renderer, shard_batches(shards, batch_size), outputs, reuse_maps=True,
                               **pass_options):
            shard, lo = out.batch.tag
            buffers, filled = filling.pop(shard.key, None) or (writer.buffers(shard, out.arrays), 0)
            for name, values in out.arrays.items():
                buffers[name].reshape(-1, *buffers[name].shape[2:])[lo : lo + len(values)] = values
            filled += len(out.inputs)
            if filled < shard.size:
                filling[shard.key] = (buffers, filled)
                continue
            if before_write is not None:
                before_write()
            writer.submit(shard, buffers)
        writer.wait()
    finally:
        writer.close()
    return sum(shard.size for shard in shards)


class ShardWriter:
    """Writes finished shards on one background thread while the teacher computes the next.

    Compression and storage I/O release the GIL, so on a CPU with a spare core (or with the teacher
    on a GPU) the write costs the teacher nothing. At most one shard waits, which bounds memory to
    two shards' buffers; shards are written in order. A written shard's buffers are handed out again:
    filling fresh memory would cost the teacher's thread a page fault per 4 KiB (docs/benchmarks.md).
    """

    def __init__(self, write: Callable[[Shard, dict[str, np.ndarray]], None]):
        self._write = write
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer")
        self._pending: tuple[Future, dict[str, np.ndarray]] | None = None
        self._spare: dict[str, np.ndarray] | None = None

    def buffers(self, shard: Shard, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Arrays ``[rows, views, ...]`` for ``shard``, shaped and typed as the batch arrays ``like``. Every
        element must be filled before :meth:`submit`: a recycled buffer still holds an earlier shard."""
        shape = (len(shard.samples), len(shard.views))
        spare, self._spare = self._spare, None
        if spare is not None and spare.keys() == like.keys() and next(iter(spare.values())).shape[:2] == shape:
            return spare
        return {name: np.empty((*shape, *values.shape[1:]), dtype=values.dtype) for name, values in like.items()}

    def submit(self, shard: Shard, arrays: dict[str, np.ndarray]) -> None:
        """Write ``arrays`` of ``shard`` in the background, once the shard before it is written."""
        self.wait()
        self._pending = (self._pool.submit(self._write, shard, arrays), arrays)

    def wait(self) -> None:
        """Block until the pending shard is written; re-raises its error."""
        if self._pending is not None:
            (future, arrays), self._pending = self._pending, None
            future.result()
            self._spare = arrays

    def close(self) -> None:
        self._pool.shutdown(wait=True)
