"""Caches anywhere fsspec reaches: the same tests on a local folder, memory:// and a real S3 server."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import zarr
import zarr.storage


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path) -> str:
    """An empty cache root on each kind of storage."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "memory":
        return f"memory://kdcache/{uuid.uuid4().hex}"
    return request.getfixturevalue("s3_root")


def test_s3_server_holds_a_zarr_group_written_through_fsspec(s3_root):
    url = s3_root + "/group"
    group = zarr.open_group(zarr.storage.FsspecStore.from_url(url, read_only=False), mode="w-", zarr_format=3)
    array = group.create_array("x", shape=(100, 3), chunks=(16, 3), dtype="float16")
    array[:] = np.arange(300, dtype=np.float16).reshape(100, 3)
    group.attrs["note"] = {"made": "by a test"}

    reopened = zarr.open_group(zarr.storage.FsspecStore.from_url(url, read_only=True), mode="r")
    assert reopened.attrs["note"] == {"made": "by a test"}
    np.testing.assert_array_equal(reopened["x"][:], np.arange(300, dtype=np.float16).reshape(100, 3))
