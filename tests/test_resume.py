"""Crash-safe resume: a precompute killed with SIGKILL and run again equals a run never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kdcache import models
from kdcache.cache.store import cache_exists, open_cache
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

DATASET = "fake:96"
VIEWS = 2
CHUNK = 4  # shards of 16 samples: 6 shards, 2 teacher batches each
BATCH = 16
SECONDS_PER_BATCH = 0.15  # the killed run's teacher is paced, so the parent can stop it between shards


def config(out: str) -> PrecomputeConfig:
    return PrecomputeConfig(dataset=DATASET, teacher="cnn", out=out, views=VIEWS, batch_size=BATCH,
                            chunk_samples=CHUNK, augment="rrc+flip+cutmix", progress=False)


def teacher(weights: str):
    net = models.create_model("cnn", 10, 3)
    models.load_weights(net, weights, spec="cnn")
    return net


def start_paced_run(weights: str, out: str) -> subprocess.Popen:
    """``precompute`` in another process whose teacher sleeps before each batch."""
    code = textwrap.dedent(f"""
        import time
        import torch
        from kdcache import models
        from kdcache.teacher.config import PrecomputeConfig
        from kdcache.teacher.precompute import precompute
        torch.set_num_threads(1)
        net = models.create_model("cnn", 10, 3)
        models.load_weights(net, {weights!r}, spec="cnn")
        forward = net.forward
        net.forward = lambda x: (time.sleep({SECONDS_PER_BATCH}), forward(x))[1]
        precompute(PrecomputeConfig(dataset={DATASET!r}, teacher="cnn", out={out!r}, views={VIEWS},
                                    batch_size={BATCH}, chunk_samples={CHUNK}, augment="rrc+flip+cutmix",
                                    progress=False), teacher=net)
    """)
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_weights):
    """The uninterrupted run every resumed cache must equal."""
    out = str(tmp_path_factory.mktemp("reference"))
    return open_cache(precompute(config(out), teacher=teacher(teacher_weights)).path)


def kill_when(proc: subprocess.Popen, path: str, shards_done: int, timeout: float = 120.0) -> int:
    """SIGKILL ``proc`` once the cache at ``path`` has ``shards_done`` done shards (-1: as soon as its
    folder appears, while the layout is being created); the number of shards done then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the paced run finished before it could be killed"
        if shards_done < 0 and os.path.isdir(path):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return 0
        if cache_exists(path):
            try:
                done = int(open_cache(path, allow_incomplete=True).shards_done().sum())
            except Exception:  # noqa: BLE001 - the layout is still being created
                done = -1
            if done >= shards_done:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return int(open_cache(path, allow_incomplete=True).shards_done().sum())
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no {shards_done} shards done within {timeout} s")


@pytest.mark.slow  # a subprocess importing torch, paced on purpose
@pytest.mark.parametrize("kill_after", [-1, 0, 1, 4])
def test_a_killed_precompute_resumes_to_the_uninterrupted_cache(tmp_path, teacher_weights, reference, kill_after):
    out = str(tmp_path / "root")
    path = f"{out}/{reference.id}"
    done_at_kill = kill_when(start_paced_run(teacher_weights, out), path, kill_after)
    assert done_at_kill < reference.num_shards

    killed = open_cache(path, allow_incomplete=True) if kill_after >= 0 else None
    done = killed.shards_done() if killed else np.zeros(reference.num_shards, dtype=bool)
    assert not (killed and killed.complete)
    for shard in np.flatnonzero(done):  # a shard marked done has every array fully written
        start, stop = reference.shard_range(int(shard))
        for name in killed.array_names:
            np.testing.assert_array_equal(killed.read_samples(name, start, stop),
                                          reference.read_samples(name, start, stop), err_msg=name)

    seen = []
    result = precompute(config(out), teacher=teacher(teacher_weights), on_batch=lambda x, z: seen.append(len(x)))
    assert result.path == path and not result.reused
    pending = sum(stop - start for start, stop in map(reference.shard_range, np.flatnonzero(~done)))
    assert sum(seen) == result.views_computed == pending * VIEWS  # no teacher forward on a finished shard

    resumed = open_cache(path)
    assert resumed.complete and resumed.manifest["cache_id"] == reference.id
    np.testing.assert_array_equal(resumed.labels(), reference.labels())
    for name in reference.array_names:
        got, want = resumed.read_samples(name, 0, reference.num_samples), \
            reference.read_samples(name, 0, reference.num_samples)
        if name.startswith("aug/"):
            assert got.tobytes() == want.tobytes(), name
        else:
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-3,
                                       err_msg=name)
