"""The writer lock: one writer per cache, on a local folder, memory:// and a real S3 server."""

from __future__ import annotations

import getpass
import os
import platform
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from tests_support import storage_location

from kdcache.cache.lock import INFO_SUFFIX, WriterLock, lock_path, read_lock
from kdcache.errors import CacheLocked


@pytest.fixture(params=["local", "memory", "s3"])
def location(request, tmp_path) -> str:
    """A cache location that does not exist yet, on each kind of storage."""
    return storage_location(request, tmp_path, "cache")


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def hold_in_subprocess(path: str, heartbeat: float) -> subprocess.Popen:
    """Another process that takes the lock, says so on stdout, and holds it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from kdcache.cache.lock import WriterLock
        lock = WriterLock({path!r}, heartbeat={heartbeat}).acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def refused_then_killed(path: str) -> None:
    """Another process holds the lock of ``path``, so this one is refused, naming it; then it is SIGKILLed."""
    proc = hold_in_subprocess(path, heartbeat=5)
    try:
        with pytest.raises(CacheLocked, match=f"pid {proc.pid}"):
            WriterLock(path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_second_writer_is_refused_with_who_holds_the_cache(location):
    with WriterLock(location):
        with pytest.raises(CacheLocked) as err:
            WriterLock(location).acquire()
    message = str(err.value)
    assert f"cache {location} is being written by {getpass.getuser()}@{platform.node()} (pid {os.getpid()}) since" \
        in message
    assert "--wait" in message and "--break-lock" in message


def test_lock_is_free_again_after_the_writer_releases_it(location):
    with WriterLock(location):
        assert read_lock(location).pid == os.getpid()
    assert read_lock(location) is None
    with WriterLock(location) as again:
        assert again.held


def test_heartbeat_keeps_the_holder_record_fresh(location):
    with WriterLock(location, heartbeat=0.1):
        first = read_lock(location)
        assert wait_for(lambda: read_lock(location).heartbeat > first.heartbeat + 0.15)
        assert read_lock(location).token == first.token


def test_wait_polls_until_the_holder_releases(location):
    holder = WriterLock(location).acquire()
    timer = threading.Timer(0.5, holder.release)
    timer.start()
    began = time.monotonic()
    with WriterLock(location, wait=True, poll=0.1) as waiter:
        assert waiter.held
        assert time.monotonic() - began >= 0.4
    timer.join()


def test_break_lock_refuses_a_lock_with_a_fresh_heartbeat(location):
    with WriterLock(location):
        with pytest.raises(CacheLocked, match="only removes a stale lock"):
            WriterLock(location, break_stale=True, stale_after=60).acquire()


def test_break_lock_takes_over_a_stale_lock_and_the_old_writer_learns_it_lost(location):
    old = WriterLock(location, heartbeat=0.4).acquire()
    time.sleep(0.2)
    new = WriterLock(location, break_stale=True, stale_after=0.1).acquire()  # old's heartbeat is 0.2 s old
    try:
        assert read_lock(location).token != old._me.token
        assert wait_for(lambda: not old.held)
        with pytest.raises(CacheLocked, match="was taken over by"):
            old.check()
        new.check()
        old.release()  # must not remove the new writer's lock
        assert read_lock(location) is not None and new.held
    finally:
        new.release()
    assert read_lock(location) is None


def test_a_killed_local_writer_leaves_no_lock_behind(tmp_path):
    path = str(tmp_path / "cache")
    refused_then_killed(path)
    with WriterLock(path) as lock:  # the kernel dropped the dead writer's flock: no --break-lock needed
        assert read_lock(path).pid == os.getpid() and lock.held


def test_break_lock_removes_the_lock_of_a_hung_local_writer(tmp_path):
    path = str(tmp_path / "cache")
    proc = hold_in_subprocess(path, heartbeat=3600)  # alive, holding its flock, never beating again
    try:
        time.sleep(0.3)
        with pytest.raises(CacheLocked):
            WriterLock(path, stale_after=0.2).acquire()
        with WriterLock(path, break_stale=True, stale_after=0.2):
            assert read_lock(path).pid == os.getpid()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_concurrent_writers_on_s3_get_exactly_one_lock(s3_root):
    path = s3_root + "/cache"
    start, won, refused = threading.Barrier(4), [], []

    def contend() -> None:
        start.wait()
        try:
            won.append(WriterLock(path).acquire())
        except CacheLocked:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3
    won[0].release()


def test_s3_lock_is_held_against_another_process(s3_root):
    path = s3_root + "/cache"
    refused_then_killed(path)
    with pytest.raises(CacheLocked):  # a killed writer's lock object stays until it is stale
        WriterLock(path, break_stale=True).acquire()
    with WriterLock(path, break_stale=True, stale_after=0.0):
        assert read_lock(path).pid == os.getpid()


def test_no_lock_file_stays_after_a_writer_releases(tmp_path):
    path = str(tmp_path / "cache")
    lock = WriterLock(path).acquire()
    assert Path(lock_path(path)).exists()
    lock.release()
    assert not Path(lock_path(path)).exists() and not Path(lock_path(path) + INFO_SUFFIX).exists()
    again = WriterLock(path).acquire()  # and the next writer takes it as usual
    again.release()
