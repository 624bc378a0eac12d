"""One writer per cache: a lock with an owner, a start time and a heartbeat.

A writer takes :class:`WriterLock` on the cache location before it creates or resumes the cache;
readers take no lock. The lock lies beside the cache, ``ROOT/<id>.lock``, so that the cache folder
holds nothing but Zarr data and a half-made one can be wiped without touching the lock:

- local paths (and NFS): an OS file lock (``filelock``, ``flock``) on that file, which the kernel
  drops when the holder dies, plus a sidecar ``ROOT/<id>.lock.json`` naming the holder and carrying
  its heartbeat, which a background thread refreshes;
- fsspec URLs (``s3://``, ``memory://``, …): the lock *is* an object holding that JSON, created with
  the filesystem's create-if-absent (a conditional ``PUT`` with ``If-None-Match: *`` on S3), then
  read back and compared, and refreshed by the heartbeat. This is best effort: docs/sharing.md says
  exactly what it guarantees.

A lock whose heartbeat is older than ``stale_after`` seconds belongs to a writer that is gone (or
hung); ``break_stale`` removes such a lock and never a fresh one. Heartbeats compare wall clocks
of different hosts, so hosts sharing a cache need synchronised clocks (NTP); a minute of slack
covers ordinary drift.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from kdcache.errors import CacheLocked
from kdcache.locations import filesystem, is_remote

LOCK_SUFFIX = ".lock"  # the lock of ROOT/<id> is ROOT/<id>.lock
INFO_SUFFIX = ".json"  # the sidecar of a local lock: ROOT/<id>.lock.json
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
SETTLE_SECONDS = 0.2  # wait before reading an object-store lock back, to catch a racing writer


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock: what ``CacheLocked`` tells the second writer."""

    owner: str
    host: str
    pid: int
    started: float  # epoch seconds
    heartbeat: float  # epoch seconds of the holder's last sign of life
    token: str  # random per acquisition: tells two holders apart even on one host

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"{self.owner}@{self.host} (pid {self.pid}) since {since}"

    def age(self) -> float:
        """Seconds since the holder's last heartbeat."""
        return max(0.0, time.time() - self.heartbeat)

    def to_json(self) -> bytes:
        return json.dumps({"kdcache": "lock", **asdict(self)}, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LockInfo | None:
        try:
            body = json.loads(raw)
            return cls(str(body["owner"]), str(body["host"]), int(body["pid"]), float(body["started"]),
                       float(body["heartbeat"]), str(body["token"]))
        except (ValueError, KeyError, TypeError):
            return None  # half-written or foreign: treated as an unknown holder


def _me() -> LockInfo:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    now = time.time()
    return LockInfo(user, platform.node(), os.getpid(), now, now, uuid.uuid4().hex)


def _unknown(when: float) -> LockInfo:
    return LockInfo("unknown", "unknown-host", 0, when, when, "")


def lock_path(path: str) -> str:
    """Where the writer lock of the cache at ``path`` lies: beside it, ``<path>.lock``."""
    return path.rstrip("/") + LOCK_SUFFIX


class _LocalBackend:
    """``flock`` on ``<cache>.lock``; holder and heartbeat in ``<cache>.lock.json``."""

    def __init__(self, path: str):
        self.lock_path = lock_path(path.removeprefix("file://"))
        self.info_path = self.lock_path + INFO_SUFFIX
        self._lock = None

    def read(self) -> LockInfo | None:
        try:
            with open(self.info_path, "rb") as f:
                return LockInfo.from_json(f.read())
        except FileNotFoundError:
            return None

    def _write(self, info: LockInfo) -> None:
        tmp = f"{self.info_path}.{info.token}"
        with open(tmp, "wb") as f:
            f.write(info.to_json())
        os.replace(tmp, self.info_path)

    def try_acquire(self, me: LockInfo) -> LockInfo | None:
        os.makedirs(os.path.dirname(os.path.abspath(self.lock_path)), exist_ok=True)
        lock = _Flock(self.lock_path)
        if not lock.try_lock():
            try:
                return self.read() or _unknown(os.path.getmtime(self.lock_path))
            except FileNotFoundError:  # its holder released or removed it this instant: report it held
                return _unknown(time.time())
        self._lock = lock
        self._write(me)
        return None

    def refresh(self, me: LockInfo) -> LockInfo | None:
        current = self.read()
        if current is None or current.token != me.token:  # removed or replaced by a --break-lock
            return current or _unknown(time.time())
        self._write(me)
        return None

    def remove_stale(self) -> None:
        # The stale holder keeps its flock on the unlinked file; the next writer locks a new file.
        for path in (self.info_path, self.lock_path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def release(self, me: LockInfo) -> None:
        current = self.read()
        if current is not None and current.token == me.token:
            os.remove(self.info_path)
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class _Flock:
    """An exclusive ``flock`` on a file that its holder deletes on release, so no empty lock files stay.

    Deleting a locked file is safe because every taker checks, once it holds the lock, that the file it
    locked is still the one at the path (not one its previous holder unlinked); if not, it tries again.
    Where ``fcntl`` is missing (Windows) this falls back to ``filelock``, which leaves the file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._fallback = None

    def try_lock(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            from filelock import FileLock, Timeout

            self._fallback = FileLock(self.path, thread_local=False)
            try:
                self._fallback.acquire(timeout=0)
                return True
            except Timeout:
                return False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # we locked a file its holder had just unlinked: lock the one at the path now

    def release(self) -> None:
        if self._fallback is not None:
            self._fallback.release()
            return
        if self._fd is not None:
            try:  # while still locked, and only our own file (a --break-lock may have replaced it)
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    os.remove(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class _ObjectBackend:
    """A lock object ``<cache>.lock`` on an fsspec filesystem, created only if absent."""

    def __init__(self, path: str):
        self.fs, self.lock_path = filesystem(lock_path(path))

    def read(self) -> LockInfo | None:
        self.fs.invalidate_cache(self.lock_path)  # listings cached by the filesystem may predate the lock
        try:
            raw = self.fs.cat_file(self.lock_path)
        except FileNotFoundError:
            return None
        return LockInfo.from_json(raw) or _unknown(time.time())

    def _create(self, body: bytes) -> bool:
        """Write ``body`` unless the object exists; False when someone else's lock is there."""
        self.fs.invalidate_cache(self.lock_path)
        if self.fs.exists(self.lock_path):
            return False
        try:
            self.fs.pipe_file(self.lock_path, body, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without create mode: plain write, the read-back decides
            self.fs.pipe_file(self.lock_path, body)
        except OSError:
            # S3 answers 412 Precondition Failed (s3fs raises OSError EINVAL) when the object exists
            self.fs.invalidate_cache(self.lock_path)
            if self.fs.exists(self.lock_path):
                return False
            raise
        return True

    def try_acquire(self, me: LockInfo) -> LockInfo | None:
        if not self._create(me.to_json()):
            return self.read() or _unknown(time.time())
        time.sleep(SETTLE_SECONDS)
        current = self.read()
        if current is None or current.token != me.token:
            return current or _unknown(time.time())
        return None

    def refresh(self, me: LockInfo) -> LockInfo | None:
        current = self.read()
        if current is None or current.token != me.token:
            return current or _unknown(time.time())
        self.fs.pipe_file(self.lock_path, me.to_json())
        return None

    def remove_stale(self) -> None:
        try:
            self.fs.rm_file(self.lock_path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.lock_path)

    def release(self, me: LockInfo) -> None:
        current = self.read()
        if current is not None and current.token == me.token:
            self.remove_stale()


def read_lock(path: str) -> LockInfo | None:
    """The holder of the writer lock of the cache at ``path``, or None when nobody writes it.

    For a local path this says who last wrote the sidecar; a writer that died leaves its sidecar
    behind only if it was killed, and then its heartbeat is old.
    """
    backend = _LocalBackend(path) if not is_remote(path) else _ObjectBackend(path)
    return backend.read()


class WriterLock:
    """The writer lock of the cache at ``path`` (a local path or an fsspec URL); a context manager.

    A lock held by another writer raises :class:`CacheLocked`, unless ``wait`` (poll every
    ``poll`` seconds until it is free) or ``break_stale`` and the holder's heartbeat is older than
    ``stale_after`` seconds. While held, a daemon thread refreshes the heartbeat every
    ``heartbeat`` seconds; :meth:`check` raises if another writer has since taken the lock over.
    """

    def __init__(self, path: str, wait: bool = False, break_stale: bool = False, stale_after: float = STALE_SECONDS,
                 heartbeat: float = HEARTBEAT_SECONDS, poll: float = 1.0):
        self.path = str(path)
        self.wait, self.break_stale, self.stale_after = wait, break_stale, stale_after
        self.heartbeat, self.poll = heartbeat, poll
        self._backend = _LocalBackend(self.path) if not is_remote(self.path) else _ObjectBackend(self.path)
        self._me: LockInfo | None = None
        self._lost: LockInfo | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._me is not None and self._lost is None

    def acquire(self) -> WriterLock:
        me = _me()
        while (holder := self._backend.try_acquire(me)) is not None:
            stale = holder.age() > self.stale_after
            if self.break_stale and stale:
                self._backend.remove_stale()
                continue
            if not self.wait:
                raise CacheLocked(self._message(holder, stale))
            time.sleep(self.poll)
            me = _me()
        self._me, self._lost = me, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="kdcache-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _message(self, holder: LockInfo, stale: bool) -> str:
        beat = f"last heartbeat {holder.age():.0f} s ago"
        if self.break_stale:  # and the lock is fresh: refuse
            return (f"cache {self.path} is being written by {holder.describe()} ({beat}, less than "
                    f"{self.stale_after:.0f} s) — --break-lock only removes a stale lock; wait for it or pass --wait")
        hint = "--break-lock if that writer is gone" if stale else "--break-lock once that writer is gone"
        return (f"cache {self.path} is being written by {holder.describe()} ({beat}) — "
                f"wait for it, pass --wait, or {hint}")

    def refresh(self) -> None:
        """Renew the heartbeat now (the background thread does every ``heartbeat`` seconds), or learn
        that another writer has taken the lock over, which :meth:`check` then reports."""
        with self._mutex:
            me = self._me
            if me is None or self._lost is not None:
                return
            me = replace(me, heartbeat=time.time())
            taker = self._backend.refresh(me)
            if taker is None:
                self._me = me
            else:
                self._lost = taker

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat) and self._lost is None:
            try:
                self.refresh()
            except OSError:
                continue  # storage briefly unreachable: try again on the next beat

    def check(self) -> None:
        """Raise :class:`CacheLocked` if this lock was broken and another writer holds the cache now."""
        if self._lost is not None:
            taker = f" by {self._lost.describe()}" if self._lost.pid else ""
            raise CacheLocked(f"cache {self.path} was taken over{taker} while this writer held it (its heartbeat "
                              "was judged stale and the lock broken) — stop here; rerun to resume if needed")

    def release(self) -> None:
        if self._me is None:
            return
        self._stop.set()  # stop beating first: a late heartbeat must not recreate a released lock
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._mutex:
            me, self._me = self._me, None
        self._backend.release(me)  # removes the holder record only while it is still this writer's

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
