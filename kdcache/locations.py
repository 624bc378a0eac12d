"""Where bytes live: a local path or an fsspec URL (``s3://bucket/prefix``, ``memory://``, ``file://``).

The one decision of local or remote for caches, roots, locks and data sources, and the one place that
turns a URL into a filesystem, so that a missing protocol driver is one line naming what to install.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from kdcache.errors import InvalidSpec, MissingData, MissingDependency
from kdcache.extras import require

#: Local file systems whose files are the kernel's, not data: reading one can block forever (/proc/kmsg).
SPECIAL_ROOTS = ("/proc", "/sys", "/dev")

#: fsspec protocols whose driver is a kdcache extra: protocol -> (module, extra).
DRIVERS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3")}


def is_remote(path: str) -> bool:
    """Whether ``path`` names an fsspec URL other than a local ``file://`` one."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str:
    """A local path without its ``file://`` prefix."""
    return str(path).removeprefix("file://")


def guard(path: str | os.PathLike, what: str = "path") -> None:
    """Refuse, in one line and before anything opens it, a local ``path`` that is neither a regular file nor a
    folder (a FIFO, a socket, a device) or lies on a kernel file system (/proc, /sys, /dev), where a read can
    block forever. Remote URLs and paths that do not exist yet pass."""
    text = str(path)
    if is_remote(text):
        return
    local = os.path.realpath(os.path.expanduser(local_path(text)))
    special = next((root for root in SPECIAL_ROOTS if local == root or local.startswith(root + "/")), None)
    if special is not None:
        raise InvalidSpec(f"{what} {text} lies on {special}, a kernel file system, not data — pass a file or "
                          "folder of your own")
    try:
        mode = os.stat(local).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidSpec(f"{what} {text} is not a regular file or folder (a pipe, socket or device) — pass a file "
                          "or folder")


def file_size(path: str | os.PathLike, what: str, limit: int, name: str) -> int:
    """The size of the local file ``path`` (a ``what``), refused in one line before anything reads it unless it is
    a regular file (:func:`guard`; not a folder, not missing) of at most ``limit`` bytes (the constant ``name``)."""
    guard(path, what)
    if not os.path.isfile(path):
        raise MissingData(f"{what} {path} {'is a folder' if os.path.isdir(path) else 'does not exist'} — pass the file")
    size = os.stat(path).st_size
    if size > limit:
        raise InvalidSpec(f"{what} {path} holds {size:,} bytes, more than {limit:,} ({name}) — it is not the file "
                          "this expects")
    return size


def unreachable(path: str, exc: BaseException) -> InvalidSpec:
    """One line for a storage that refused ``path`` (no credentials, no such bucket, no network): what it said,
    and where credentials come from."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return InvalidSpec(f"{path} cannot be reached ({type(exc).__name__}: {text}) — check the URL, and the credentials "
                       "(environment variables such as AWS_ACCESS_KEY_ID, or fsspec's configuration)")


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether local ``path`` is ``folder`` or lies below it (symbolic links resolved; remote: never)."""
    if is_remote(str(path)) or is_remote(str(folder)):
        return False
    here = Path(os.path.realpath(os.path.expanduser(local_path(str(path)))))
    there = Path(os.path.realpath(os.path.expanduser(local_path(str(folder)))))
    return here == there or there in here.parents


def protocol(path: str) -> str:
    """The URL's protocol (``file`` for a local path)."""
    return str(path).split("://", 1)[0].lower() if is_remote(path) else "file"


def require_driver(path: str) -> None:
    """Raise MissingDependency, naming the extra, when the driver of ``path``'s protocol is not installed."""
    name = protocol(path)
    if name in DRIVERS:
        module, extra = DRIVERS[name]
        require(module, extra, f"{path} ({name.upper()})")


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a local path or URL; one line for a protocol that fsspec
    does not know or whose driver is missing."""
    import fsspec  # a dependency of torch

    guard(path)
    require_driver(path)
    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as exc:  # a protocol fsspec knows, its driver not installed
        raise MissingDependency(f"{path}: {exc} — install the package fsspec names") from None
    except ValueError as exc:  # "Protocol not known"
        raise InvalidSpec(f"{path}: {exc} — use a local path or an fsspec URL such as s3://bucket/prefix") from None
