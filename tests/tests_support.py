"""Helpers shared by test modules."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from kdcache_cli.main import main

from kdcache import models
from kdcache.cache.lock import INFO_SUFFIX, LockInfo, lock_path, read_lock
from kdcache.locations import is_remote
from kdcache.teacher.config import PrecomputeConfig


def save_cnn_teacher(folder: Path, name: str, seed: int, scale: float) -> str:
    """Weights of a seeded random `cnn` for `fake:64` (10 classes, 3 channels), its classifier scaled
    by ``scale`` so that its outputs are confident; returns the file's path."""
    torch.manual_seed(seed)
    net = models.create_model("cnn", 10, 3)
    with torch.no_grad():
        net.fc.weight.mul_(scale)
    path = folder / name
    torch.save(net.state_dict(), path)
    return str(path)


def storage_location(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> str:
    """A location that does not exist yet on the storage ``request.param`` names: local, memory or s3."""
    if request.param == "local":
        return str(tmp_path / name)
    if request.param == "memory":
        return f"memory://{name}/{uuid.uuid4().hex}"
    return request.getfixturevalue("s3_root") + f"/{name}"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``kdcache ARGV`` in-process; return (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["kdcache", *argv]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def precompute_config(out, weights, **overrides) -> PrecomputeConfig:
    """The tests' precompute settings: the `cnn` teacher on `fake:64`, 3 views, small chunks, no progress bar."""
    base = dict(dataset="fake:64", teacher="cnn", weights=weights, out=str(out), views=3, batch_size=50,
                chunk_samples=16, progress=False)
    return PrecomputeConfig(**(base | overrides))


def forge_stale_lock(path: str) -> None:
    """Make the lock of ``path`` look like one whose writer stopped beating two minutes ago."""
    info = read_lock(path)
    stale = LockInfo(info.owner, info.host, info.pid, info.started - 120, info.heartbeat - 120, info.token)
    target = lock_path(path) + ("" if is_remote(path) else INFO_SUFFIX)
    fs, fpath = fsspec.core.url_to_fs(target)
    fs.pipe_file(fpath, stale.to_json())
