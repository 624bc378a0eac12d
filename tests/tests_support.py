"""Helpers shared by test modules."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def pillow_before_13():
    """Pillow's ``Image.resize`` as Pillow 9.5 to 12.2 ran it, under any Pillow: horizontal pass, then vertical
    (Pillow 13 takes the vertical pass first for some shapes). The other projects' code that the tests retell ran
    under those Pillows, so their renders are made inside this."""
    from PIL import Image

    original = Image.Image.resize

    def resize(self, size, resample=None, box=None, reducing_gap=None):
        if box is None and reducing_gap is None and resample not in (None, Image.Resampling.NEAREST) \
                and self.width != size[0] and self.height != size[1]:
            return original(original(self, (size[0], self.height), resample), size, resample)
        return original(self, size, resample, box, reducing_gap)

    Image.Image.resize = resize
    try:
        yield
    finally:
        Image.Image.resize = original
