"""Caches anywhere fsspec reaches: the same tests on a local folder, memory:// and a real S3 server."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import s3server
import zarr
import zarr.storage
from tests_support import forge_stale_lock, run_cli, storage_location

from kdcache.cache.lock import WriterLock, read_lock
from kdcache.cache.store import open_cache
from kdcache.errors import CacheCorrupt, CacheLocked
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path) -> str:
    """An empty cache root on each kind of storage."""
    return storage_location(request, tmp_path, "root")


def test_s3_server_holds_a_zarr_group_written_through_fsspec(s3_root):
    url = s3_root + "/group"
    group = zarr.open_group(zarr.storage.FsspecStore.from_url(url, read_only=False), mode="w-", zarr_format=3)
    array = group.create_array("x", shape=(100, 3), chunks=(16, 3), dtype="float16")
    array[:] = np.arange(300, dtype=np.float16).reshape(100, 3)
    group.attrs["note"] = {"made": "by a test"}

    reopened = zarr.open_group(zarr.storage.FsspecStore.from_url(url, read_only=True), mode="r")
    assert reopened.attrs["note"] == {"made": "by a test"}
    np.testing.assert_array_equal(reopened["x"][:], np.arange(300, dtype=np.float16).reshape(100, 3))


def cli_precompute(root: str, weights: str, *extra: str) -> list[str]:
    return ["precompute", "--dataset", "fake:64", "--teacher", "cnn", "--weights", weights, "--out", root,
            "--views", "2", "--batch-size", "64", "--device", "cpu", "--quiet", *extra]


def test_precompute_info_verify_ls_and_train_work_on_every_storage(root, teacher_weights, tmp_path, capsys):
    code, out, err = run_cli(cli_precompute(root, teacher_weights), capsys)
    assert code == 0, err
    path = out.split(" written to ")[1].split(": ")[0]
    assert path.startswith(root)
    code, out, _ = run_cli(cli_precompute(root, teacher_weights), capsys)
    assert code == 0 and "reusing complete cache" in out

    code, out, err = run_cli(["info", path, "--json"], capsys)
    assert code == 0, err
    manifest = json.loads(out)["manifest"]
    assert manifest["status"] == "complete"
    assert s3server.ACCESS_KEY not in out and s3server.SECRET_KEY not in out  # no credentials in a manifest
    code, out, err = run_cli(["verify", path], capsys)
    assert code == 0 and "intact" in out, out + err
    code, out, err = run_cli(["ls", root], capsys)
    assert code == 0 and manifest["cache_id"] in out, out + err
    code, out, err = run_cli(["train", "--dataset", "fake:64", "--model", "cnn", "--cache", path, "--epochs", "1",
                              "--batch-size", "32", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"],
                             capsys)
    assert code == 0 and "test top-1" in out, err


def test_readers_see_the_finished_shards_of_a_cache_being_written(root, teacher_weights):
    settings = dict(dataset="fake:64", teacher="cnn", weights=teacher_weights, views=2, batch_size=32,
                    chunk_samples=4, device="cpu", progress=False)  # 4 shards of 16 samples, 2 batches each
    reference = open_cache(precompute(PrecomputeConfig(out=f"{root}-reference", **settings)).path)
    path = reference.path.replace(f"{root}-reference", root)
    seen: list[int] = []
    shard_written = threading.Event()
    reader_done = threading.Event()

    def pace(inputs, logits) -> None:  # after the first shard is written, wait for the reader to look
        seen.append(len(inputs))
        if len(seen) == 3:
            shard_written.set()
            reader_done.wait(60)

    writer = threading.Thread(target=precompute, args=(PrecomputeConfig(out=root, **settings),),
                              kwargs={"on_batch": pace})
    writer.start()
    try:
        assert shard_written.wait(120)
        assert read_lock(path) is not None  # the writer holds its lock; the reader takes none
        cache = open_cache(path, allow_incomplete=True)
        done = cache.shards_done()
        assert not cache.complete and done[0] and not done[1:].all()
        start, stop = cache.shard_range(0)
        for name in cache.array_names:
            np.testing.assert_array_equal(cache.read_samples(name, start, stop),
                                          reference.read_samples(name, start, stop))
        with pytest.raises(CacheCorrupt, match="incomplete"):
            open_cache(path)  # training waits for the whole cache
    finally:
        reader_done.set()
        writer.join()
    assert open_cache(path).complete and read_lock(path) is None


def test_a_second_writer_stops_with_exit_2_and_break_lock_takes_over_only_a_stale_lock(root, teacher_weights,
                                                                                       capsys):
    settings = dict(dataset="fake:64", teacher="cnn", weights=teacher_weights, views=2, batch_size=64,
                    device="cpu", progress=False)
    cid = precompute(PrecomputeConfig(out=f"{root}-reference", **settings)).cache_id
    path = f"{root}/{cid}"
    holder = WriterLock(path, heartbeat=3600).acquire()  # a writer that will stop beating
    try:
        code, _, err = run_cli(cli_precompute(root, teacher_weights), capsys)
        assert code == 2
        assert err.startswith(f"Error: cache {path} is being written by ") and f"(pid {os.getpid()}) since " in err
        assert len(err.strip().splitlines()) == 1
        code, _, err = run_cli(cli_precompute(root, teacher_weights, "--break-lock"), capsys)
        assert code == 2 and "only removes a stale lock" in err

        forge_stale_lock(path)
        code, out, err = run_cli(cli_precompute(root, teacher_weights, "--break-lock"), capsys)
        assert code == 0 and " written to " in out, err
        holder.refresh()  # its next heartbeat finds the lock taken over
        with pytest.raises(CacheLocked, match="taken over"):
            holder.check()
    finally:
        holder.release()
    assert read_lock(path) is None and open_cache(path).complete


def test_wait_lets_the_second_writer_finish_after_the_first(root, teacher_weights, capsys):
    settings = dict(dataset="fake:64", teacher="cnn", weights=teacher_weights, views=2, batch_size=64,
                    device="cpu", progress=False)
    cid = precompute(PrecomputeConfig(out=f"{root}-reference", **settings)).cache_id
    holder = WriterLock(f"{root}/{cid}").acquire()
    timer = threading.Timer(1.5, holder.release)
    timer.start()
    code, out, err = run_cli(cli_precompute(root, teacher_weights, "--wait"), capsys)
    timer.join()
    assert code == 0 and " written to " in out, err


def test_reading_a_cache_on_s3_costs_one_request_per_object(s3_root, teacher_weights, monkeypatch):
    """No zarr v2 probes (.zgroup, .zattrs, .zmetadata) and no HEAD before each GET (s3fs's concurrent
    download asks every object's size first): before the fix an epoch's fixed cost was 46 HEADs."""
    import s3fs

    from tests_support import precompute_config

    path = precompute(precompute_config(s3_root + "/reqs", teacher_weights)).path
    calls: list[tuple[str, str]] = []
    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls.append((getattr(method, "__name__", str(method)), kwargs.get("Key", "")))
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    cache = open_cache(path)
    cache.read_blocks(cache.target_arrays(), [(0, 16, 0), (16, 32, 1)])
    keys = [key for _, key in calls]
    assert not [k for k in keys if k.endswith((".zgroup", ".zattrs", ".zmetadata"))], keys
    heads = [key for method, key in calls if method == "head_object"]
    assert not [k for k in heads if k.endswith("zarr.json") or "/c/" in k], heads
