"""Several processes: what a rank needs to know, and how ``--nproc N`` starts them.

``torchrun`` (or ``--nproc N``, which re-executes the command under ``torch.distributed.run``)
sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. A single process needs no process group, so every
helper here is a no-op when ``WORLD_SIZE`` is 1 or unset; with more, the group uses gloo on CPU
and NCCL on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from kdcache.errors import InvalidSpec

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) in a plain process."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise InvalidSpec(f"RANK/WORLD_SIZE are not integers ({exc}) — launch with torchrun or --nproc") from exc
    if world < 1 or not 0 <= rank < world:
        raise InvalidSpec(f"RANK={rank} WORLD_SIZE={world} is not a valid rank — launch with torchrun or --nproc")
    return rank, world


def local_rank() -> int:
    """This process's index on its node (its GPU under NCCL)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0, the process that creates, finishes and reports."""
    return rank_world()[0] == 0


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (so ``--nproc`` must not start more)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def init_if_needed(device: torch.device | str = "cpu") -> torch.device:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; return the device this rank computes on.

    The backend follows the device: NCCL for CUDA (each rank on ``cuda:LOCAL_RANK`` unless the
    device names an index), gloo for CPU. Calling it again is harmless.
    """
    device = torch.device(device)
    _, world = rank_world()
    if world == 1:
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise InvalidSpec(f"WORLD_SIZE={world} is set but {' and '.join(missing)} is not — "
                              "launch with torchrun or --nproc, or unset WORLD_SIZE")
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def barrier() -> None:
    """Wait until every rank gets here; nothing to wait for in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def strip_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``kdcache ARGV`` (minus ``--nproc``) as ``nproc`` processes on this machine; their exit status.

    Equivalent to ``torchrun --standalone --nproc-per-node N -m kdcache ARGV``. Each process gets
    an equal share of the CPU threads unless ``OMP_NUM_THREADS`` is set.
    """
    if nproc < 1:
        raise InvalidSpec(f"--nproc must be at least 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "kdcache",
                                         *strip_option(argv, "--nproc")])
    try:
        run(args)
    except ChildFailedError as exc:
        # The ranks have printed their own one-line errors; pass on their status (2: bad input) and
        # leave out torchrun's report and traceback.
        codes = [failure.exitcode for failure in exc.failures.values()]
        return 2 if 2 in codes else max((c for c in codes if c > 0), default=1)
    return 0


def all_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums of ``values`` over every rank (the values themselves in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def uneven(batches: Iterable[T], module: torch.nn.Module) -> Iterator[T]:
    """``batches``, iterated inside DDP's ``Join`` when ``module`` is DDP: ranks may then run different
    numbers of steps (their shares of an epoch differ by up to one block) without hanging; at the end
    the last rank to finish broadcasts its parameters, so every rank leaves with the same model."""
    if not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield from batches
        return
    from torch.distributed.algorithms.join import Join

    with Join([module]):
        yield from batches


class _WithExtras(torch.nn.Module):
    """A model and modules trained beside it (a loss's adaptors): DDP averages the gradients of both."""

    def __init__(self, model: torch.nn.Module, extras: torch.nn.Module):
        super().__init__()
        self.model, self.extras = model, extras

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def wrap(model: torch.nn.Module, device: torch.device, extras: torch.nn.Module | None = None) -> torch.nn.Module:
    """What to call for the forward pass: ``model`` in DistributedDataParallel when there are several ranks
    (with ``extras``' trainable parameters synchronised too), else ``model`` itself."""
    if rank_world()[1] == 1:
        return model
    if extras is not None and any(p.requires_grad for p in extras.parameters()):
        model = _WithExtras(model, extras)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
