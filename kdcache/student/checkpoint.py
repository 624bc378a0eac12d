"""A training run's files: run.json, metrics.jsonl, checkpoint.pt (everything ``--resume`` needs) and
model.pt (the student alone), written by rank 0 after every epoch, and removed again when a fresh run
fails before its first checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdcache.errors import InvalidSpec
from kdcache.student.setup import Run

# Settings that may differ between a run and its --resume without changing what it computes.
RESUMABLE = {"resume", "progress", "workers", "device", "precision", "compile"}  # auto precision follows the device


def is_fresh(out: Path) -> bool:
    """Whether ``out`` holds no started run."""
    return not (out / "checkpoint.pt").exists() and not (out / "run.json").exists()


def start(run: Run) -> tuple[int, list[dict[str, Any]]]:
    """Write run.json and, with ``--resume``, restore the last checkpoint: (first epoch to run, metrics so far)."""
    run.out.mkdir(parents=True, exist_ok=True)
    record = run.record()
    start_epoch, metrics = 0, []
    if run.cfg.resume and run.checkpoint_path.exists():
        check_resumable(run.out, record)
        start_epoch = load(run)
        metrics = read_metrics(run.out / "metrics.jsonl")[:start_epoch]
    if run.rank == 0:
        (run.out / "run.json").write_text(json.dumps(record, indent=2))
    return start_epoch, metrics


def check_resumable(out: Path, record: dict[str, Any]) -> None:
    """Refuse to continue a run with other settings: the result would match neither run."""
    saved_path = out / "run.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    changed = sorted(k for k, v in record.items() if k not in RESUMABLE and saved.get(k, v) != v)
    if changed:
        raise InvalidSpec(f"--resume with other settings than {out} was started with ({', '.join(changed)}) "
                          "— repeat the original options, or train into a new --out")


def load(run: Run) -> int:
    """Restore model, EMA, loss, optimizer, schedule, scaler and RNG from checkpoint.pt; the next epoch."""
    state = torch.load(run.checkpoint_path, map_location=run.device, weights_only=True)
    run.model.load_state_dict(state["model"])
    if run.ema is not None and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    run.criterion.load_state_dict(state["loss"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler.is_enabled() and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return int(state["epoch"]) + 1


def save(run: Run, epoch: int, metrics: list[dict[str, Any]]) -> None:
    """After epoch ``epoch``: metrics.jsonl, checkpoint.pt, model.pt (and model_ema.pt with --ema)."""
    write_metrics(run.out / "metrics.jsonl", metrics)
    torch.save({"model": run.model.state_dict(), "loss": run.criterion.state_dict(),
                "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch,
                "ema": run.ema.state_dict() if run.ema is not None else None}, run.checkpoint_path)
    torch.save(run.model.state_dict(), run.out / "model.pt")  # the student alone: adaptors stay in checkpoint.pt
    if run.ema is not None:
        torch.save(run.ema.state_dict(), run.out / "model_ema.pt")


@contextlib.contextmanager
def discarded_on_failure(out: Path, fresh: bool) -> Iterator[None]:
    """Remove what a fresh run wrote when it fails before its first checkpoint: nothing would resume
    from it, and a later run must not take it for a started one."""
    try:
        yield
    except BaseException:
        if fresh and not (out / "checkpoint.pt").exists():
            for name in ("run.json", "metrics.jsonl", "run.toml"):
                (out / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    """One JSON line per epoch, replaced whole (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
