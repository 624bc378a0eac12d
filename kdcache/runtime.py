"""Where and on how many threads work runs: the device, DataLoader worker counts, Zarr's codec threads
beside a model, and a background thread that produces batches ahead of their consumer.

Both stages use these; they know nothing of caches or models.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from kdcache.errors import InvalidSpec

T = TypeVar("T")

#: A forward precision (``--precision``) -> its autocast dtype (None: plain float32).
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device, older_gpu: str = "fp32") -> str:
    """``auto`` is bf16 on a CUDA device that supports it, ``older_gpu`` on one that does not, fp32 on a
    CPU; other values are kept."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else older_gpu
    return "fp32"


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as exc:
        raise InvalidSpec(f"unknown device {device!r} — use auto, cpu or cuda[:N]") from exc
    if picked.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidSpec(f"--device {device}: this machine has no usable CUDA GPU — use --device auto or cpu")
        if picked.index is not None and picked.index >= count:
            raise InvalidSpec(f"--device {device}: this machine has {count} CUDA GPU(s), numbered 0..{count - 1}")
    return picked


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader worker processes: ``requested``, or by default up to 4 beside a CUDA device and none
    on CPU, where a worker takes its core from the model's own threads."""
    if requested is not None:
        if requested < 0:
            raise InvalidSpec(f"--workers must be 0 or more, got {requested}")
        return requested
    if device.type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def codec_threads(device: torch.device) -> int | None:
    """Threads Zarr may compress and decompress on beside a model on ``device``: on a CPU the cores
    the model's threads leave free, at least one; beside a GPU, Zarr's own default (None)."""
    if device.type == "cuda":
        return None
    return max(1, (os.cpu_count() or 1) - torch.get_num_threads())


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced on a background thread up to ``depth`` ahead of the consumer.

    Reading, decoding and rendering spend most of their time in kernels that release the GIL, as
    does the model's step, so without DataLoader worker processes this still overlaps the data
    path with the model (on a spare core, or a GPU) — with no fork and no inter-process copy of
    each batch. The order of ``items`` is kept; an error raised while producing is raised here.
    """
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put((False, exc))
            return
        put((True, done))

    thread = threading.Thread(target=produce, name="kdcache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class HostCopier:
    """Copies a batch's device tensors to the host: from a CUDA device with non-blocking copies into
    pinned buffers (kept for the next batch of the same shapes) and one synchronisation for all of them;
    CPU tensors are handed back as they are."""

    def __init__(self) -> None:
        self._pinned: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def copy(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not any(t.is_cuda for t in tensors.values()):
            return {name: t.detach() for name, t in tensors.items()}
        out = {}
        for name, t in tensors.items():
            key = (name, tuple(t.shape), t.dtype)
            if key not in self._pinned:
                self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out[name] = self._pinned[key].copy_(t, non_blocking=True)
        torch.cuda.current_stream(next(iter(tensors.values())).device).synchronize()
        # the buffers are refilled by the next batch while the writer may still hold this one: hand out copies
        return {name: t.clone() for name, t in out.items()}
