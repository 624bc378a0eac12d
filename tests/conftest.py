"""Shared fixtures: tiny real things (a fake dataset, a 2-layer CNN teacher, a small cache)."""

from __future__ import annotations

import pytest
import torch
from s3server import s3_root, s3_server  # noqa: F401  (a SeaweedFS S3 server on loopback, tests/s3server.py)
from tests_support import save_cnn_teacher

from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

DATASET = "fake:64"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the S3 server carries the ``s3`` marker (``-m "not s3"`` runs without it)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if {"s3_root", "s3_server"} & set(getattr(item, "fixturenames", ())) or "s3" in params.values():
            item.add_marker(pytest.mark.s3)


@pytest.fixture(autouse=True, scope="session")
def shard_index_dir(tmp_path_factory):
    """WebDataset shard indices go to a folder of the test session, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDCACHE_INDEX_DIR", str(tmp_path_factory.mktemp("wds-index")))
        yield


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny forward passes on a shared 2-core machine are faster that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> str:
    """Weights of a fixed random `cnn` teacher for `fake:64` (10 classes, 3 channels).

    Its classifier is scaled up so its outputs are confident and differ from any student's.
    """
    return save_cnn_teacher(tmp_path_factory.mktemp("teacher"), "teacher.pt", seed=1234, scale=20)


@pytest.fixture(scope="session")
def cache_path(tmp_path_factory, teacher_weights) -> str:
    """A complete 3-view cache of `fake:64` made by the `cnn` teacher (read-only: do not modify)."""
    root = tmp_path_factory.mktemp("cache")
    result = precompute(PrecomputeConfig(dataset=DATASET, teacher="cnn", weights=teacher_weights, out=str(root),
                                         views=3, batch_size=50, chunk_samples=16, progress=False))
    return result.path
