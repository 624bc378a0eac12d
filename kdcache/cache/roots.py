"""A root of caches: where caches and their aliases lie, for local paths and fsspec URLs alike.

``precompute --out ROOT`` writes a cache to ``ROOT/<cache id>`` and an alias file ``ROOT/<alias>``
beside it: a small JSON object naming the id, so a readable name works the same on local disks and
object stores (which have no symlinks). See docs/format.md, "Where caches live".
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from kdcache.errors import CacheCorrupt, InvalidSpec, MissingData
from kdcache.locations import filesystem, unreachable

ALIAS_KIND = "alias"
ALIAS_VERSION = 1
#: A cache id: 16 lowercase hex digits (kdcache.cache.manifest.cache_id). Every name read from a manifest or an
#: alias file is checked against it before a path is built from it, so nothing leads outside a root.
CACHE_ID = re.compile(r"[0-9a-f]{16}")


def check_cache_id(cid: object, where: str) -> str:
    """``cid`` when it is a cache id; CacheCorrupt naming ``where`` otherwise (a damaged or hostile file)."""
    if not isinstance(cid, str) or not CACHE_ID.fullmatch(cid):
        shown = repr(cid)[:60]
        raise CacheCorrupt(f"{where} names cache id {shown}, which is not a cache id (16 hex digits) — the file is "
                           "damaged or was edited; nothing was followed or written")
    return cid


def alias_name(manifest: Mapping[str, Any], cid: str) -> str:
    """Readable, filesystem-safe name of a cache: ``<dataset>-<teacher>-k<views>-<id[:8]>``."""
    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("._")[:40]

    teacher = "+".join(safe(m["spec"]) for m in manifest["teacher"]["members"])
    return f"{safe(manifest['dataset']['spec'])}-{teacher}-k{manifest['recipe']['views']}-{cid[:8]}"


def join(root: str, name: str) -> str:
    """``root/name`` for a local path or a URL."""
    if not root:
        return name
    return root + name if root.endswith("/") else f"{root}/{name}"


def _parent(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0]


def read_alias(path: str) -> str | None:
    """The cache id an alias file at ``path`` names, or None when ``path`` is not an alias."""
    try:
        fs, fpath = filesystem(path)
        if not fs.isfile(fpath) or fs.size(fpath) > 65536:
            return None
        ref = json.loads(fs.cat_file(fpath))
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(ref, dict) and ref.get("kdcache") == ALIAS_KIND:
        return check_cache_id(ref.get("cache_id"), f"alias {path}")
    return None


def resolve(path: str) -> str:
    """Where the cache ``path`` names lies: ``path`` itself, or ``ROOT/<id>`` for an alias ``ROOT/<alias>``."""
    target = read_alias(path)
    return path if target is None else join(_parent(path), target)


def write_alias(root: str, alias: str, cid: str) -> str:
    """Record ``ROOT/<alias>`` -> ``ROOT/<cid>`` unless that alias already exists; return its path."""
    check_cache_id(cid, f"alias {alias}")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", alias) or alias in (".", ".."):
        raise CacheCorrupt(f"alias name {alias!r} is not a file name — the manifest it came from is damaged")
    path = join(root, alias)
    fs, fpath = filesystem(path)
    if not fs.exists(fpath):
        body = json.dumps({"kdcache": ALIAS_KIND, "format_version": ALIAS_VERSION, "cache_id": cid}, indent=1)
        fs.pipe_file(fpath, body.encode())
    return path


def publish_aliases(path: str, manifest: Mapping[str, Any]) -> list[str]:
    """Alias files ``ROOT/<readable alias>`` and, when the folder is named otherwise, ``ROOT/<cache id>``
    naming the folder of the cache at ``path``: how a cache whose id changed (extend, upgrade) is found. An alias
    names a cache id only, so a cache in a folder not named by one (not laid out by kdcache) gets none."""
    root, _, folder = path.rstrip("/").rpartition("/")
    check_cache_id(manifest.get("cache_id"), f"the manifest of {path}")
    if not CACHE_ID.fullmatch(folder):
        return []
    aliases = [write_alias(root, alias_name(manifest, manifest["cache_id"]), folder)]
    if manifest["cache_id"] != folder:
        aliases.append(write_alias(root, manifest["cache_id"], folder))
    return aliases


def scan_root(root: str) -> tuple[list[str], dict[str, list[str]]]:
    """Every sub-folder of ``root`` (candidate caches) and, per cache id, the alias paths naming it."""
    fs, froot = filesystem(root)
    try:
        entries = fs.ls(froot, detail=True)
    except FileNotFoundError as exc:
        raise MissingData(f"no folder {root} — pass the --out ROOT given to precompute") from exc
    except NotADirectoryError:
        raise InvalidSpec(f"{root} is a file — pass the --out ROOT given to precompute, a folder") from None
    except Exception as exc:  # noqa: BLE001 - a remote store's refusal (credentials, network) in one line
        raise unreachable(root, exc) from None
    folders, aliases = [], {}
    for entry in sorted(entries, key=lambda e: e["name"]):
        path = join(root, entry["name"].rstrip("/").rpartition("/")[2])
        if entry["type"] == "directory":
            folders.append(path)
        else:
            try:
                cid = read_alias(path)
            except CacheCorrupt:  # an alias naming no cache id is not followed, nor listed
                continue
            if cid is not None:
                aliases.setdefault(cid, []).append(path)
    return folders, aliases


def disk_usage(path: str) -> int:
    """Bytes of every object under ``path``."""
    fs, fpath = filesystem(path)
    return int(fs.du(fpath, total=True))


def where_caches_are(path: str) -> str:
    """How to fix opening ``path``: name a cache of it when it is a root of caches."""
    try:
        _, aliases = scan_root(path)
    except (MissingData, OSError, ValueError):
        aliases = {}
    if aliases:
        example = next(iter(aliases.values()))[0]
        return (f"it is a root of caches: pass one of them, e.g. {example} "
                f"(`kdcache ls {path}` lists all {len(aliases)})")
    return "pass the cache path or alias that `kdcache precompute` printed"
