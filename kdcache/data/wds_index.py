"""The index of WebDataset shards: every sample's shard, key, image byte range and label, from one scan of
the shards' member headers, kept as a small local index per shard version (``$KDCACHE_INDEX_DIR``) so that
later runs and other processes read no shard to find them (docs/datasets-and-models.md)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.data.images import MAX_CLASSES
from kdcache.errors import DataCorrupt, MissingData
from kdcache.locations import filesystem, is_remote, local_path

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = the path up to the first dot of the file name


def sibling_split(pattern: str) -> tuple[str, ...]:
    """The shards named like the train ones with ``val`` (else ``test``) for ``train``, each brace
    range standing for any run of characters (a val split usually has fewer shards)."""
    at = pattern.rfind("train")
    for name in ("val", "test"):
        if at >= 0:
            fs, path = filesystem(re.sub(r"\{[^{}]*\}", "*", pattern[:at] + name + pattern[at + 5:]))
            found = sorted(fs.glob(path))
            if found:
                return tuple(p if "://" not in pattern else fs.unstrip_protocol(p) for p in found)
    raise MissingData(f"no val shards for wds:{pattern} — name them with ?val=PATTERN (e.g. val-{{000..003}}.tar)")


@dataclass
class ShardIndex:
    """Every sample of a list of shards: its shard, key, image byte range and extension, and its label."""

    urls: tuple[str, ...]
    shard: np.ndarray  # int32 [N]
    keys: list[str]
    offsets: np.ndarray  # int64 [N], of the image member's data
    sizes: np.ndarray  # int64 [N]
    labels: np.ndarray  # int64 [N]
    counts: list[int] = field(default_factory=list)  # samples per shard

    def parts(self) -> list[dict[str, Any]]:
        """Per shard, in order: name, sample count and the sha256 of its (key, size, label) list."""
        out, start = [], 0
        for url, count in zip(self.urls, self.counts):
            digest = hashlib.sha256()
            for i in range(start, start + count):
                digest.update(f"{self.keys[i]}\t{int(self.sizes[i])}\t{int(self.labels[i])}\n".encode())
            out.append({"name": os.path.basename(url), "samples": count, "sha256": "sha256:" + digest.hexdigest()})
            start += count
        return out


def _exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def require(urls: tuple[str, ...]) -> None:
    """Refuse, in one line, a shard list of which some shards are not there."""
    missing = [url for url in urls if not _exists(url)]
    if missing:
        raise MissingData(f"shard {missing[0]} not found ({len(missing)} of the pattern's {len(urls)} shards are "
                          "missing) — check the wds: pattern (brace ranges such as {000..146})")


def index_dir() -> Path:
    """Where shard indices are kept between runs: ``$KDCACHE_INDEX_DIR``, else ``~/.cache/kdcache/wds-index``."""
    return Path(os.environ.get("KDCACHE_INDEX_DIR") or Path.home() / ".cache" / "kdcache" / "wds-index")


def _version(url: str) -> str:
    """What changes whenever a shard's content does: on an object store its size and ETag (a hash of the
    content); on a local disk its size, inode and change time (``st_ctime``, which every write moves and no
    one can set back, unlike the modification time)."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise MissingData(f"shard {url} not found — check the wds: pattern (brace ranges such as "
                          "{000..146})") from None
    if not is_remote(url):
        st = os.stat(local_path(url))
        return f"{url}\t{st.st_size}\t{st.st_ino}\t{st.st_mtime_ns}\t{st.st_ctime_ns}"
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{url}\t{info.get('size')}\t{stamp}"


def _indexed(url: str, image_keys: tuple[str, ...], label_key: str) -> list[tuple[str, int, int, int]]:
    """One shard's samples, from the local index of an earlier scan of the same shard version, else scanned."""
    name = hashlib.sha256(f"{_version(url)}\t{','.join(image_keys)}\t{label_key}".encode()).hexdigest()[:32]
    path = index_dir() / f"{name}.json"
    try:
        return [tuple(entry) for entry in json.loads(path.read_text())]
    except (OSError, ValueError):
        pass
    found = _scan_shard(url, image_keys, label_key)
    with contextlib.suppress(OSError):  # an index that cannot be kept is scanned again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, path)
    return found


def scan(urls: tuple[str, ...], image_keys: tuple[str, ...], label_key: str) -> ShardIndex:
    """Every shard's samples in order: from one scan of its member headers (and label members), kept as
    a small local index so that later runs and other processes read no shard to find them."""
    require(urls)
    shard, keys, offsets, sizes, labels, counts = [], [], [], [], [], []
    first_shard: dict[str, int] = {}
    for s, url in enumerate(urls):
        found = _indexed(url, image_keys, label_key)
        for key, offset, size, label in found:
            if first_shard.setdefault(key, s) != s:
                raise DataCorrupt(f"sample {key} is in shard {urls[first_shard[key]]} and again in shard {url} — a "
                                  "key names one sample: rename or remove one")
            shard.append(s)
            keys.append(key)
            offsets.append(offset)
            sizes.append(size)
            labels.append(label)
        counts.append(len(found))
    return ShardIndex(urls, np.array(shard, dtype=np.int32), keys, np.array(offsets, dtype=np.int64),
                      np.array(sizes, dtype=np.int64), np.array(labels, dtype=np.int64), counts)


def _scan_shard(url: str, image_keys: tuple[str, ...], label_key: str) -> list[tuple[str, int, int, int]]:
    """(key, image offset, image size, label) of each sample of one shard, in member order."""
    fs, path = filesystem(url)
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    last, end, current = "its first member", 0, None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                end = member.offset_data + member.size
                parsed = _MEMBER.match(member.name) if member.isfile() else None
                if parsed is None:
                    continue
                key, ext = parsed.group(1), parsed.group(2).lower()
                if key != current and key in samples:
                    raise DataCorrupt(f"shard {url} holds sample {key} twice (its members appear again after other "
                                      "samples') — a key names one sample: rename or remove the second")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                current = key
                entry = samples[key]
                if ext == label_key and "label" in entry:
                    raise DataCorrupt(f"shard {url}: sample {key} has two .{label_key} members — keep one")
                if ext in image_keys and "image" not in entry:
                    entry["image"] = (member.offset_data, member.size, image_keys.index(ext))
                elif ext in image_keys and image_keys.index(ext) < entry["image"][2]:
                    entry["image"] = (member.offset_data, member.size, image_keys.index(ext))
                elif ext == label_key:
                    entry["label"] = tar.extractfile(member).read()
                last = f"sample {key}"
        # A tar ends with two zero blocks after its last member's padded data; a shorter file was cut off.
        if fs.size(path) < -(-end // 512) * 512 + 1024:
            raise tarfile.ReadError(f"the file ends before the archive does ({fs.size(path)} bytes)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataCorrupt(f"shard {url} is damaged after {last} ({exc}) — re-create or re-download it") from None
    return [_sample(url, key, samples[key], image_keys, label_key) for key in order]


def _sample(url: str, key: str, entry: dict[str, Any], image_keys: tuple[str, ...],
            label_key: str) -> tuple[str, int, int, int]:
    if "image" not in entry:
        raise DataCorrupt(f"shard {url}: sample {key} has no image member (.{', .'.join(image_keys)}) — add it, or "
                          "name its extension with ?image=EXT")
    if "label" not in entry:
        raise DataCorrupt(f"shard {url}: sample {key} has no .{label_key} label — add it, or name the label "
                          "member with ?label=EXT")
    try:
        label = int(entry["label"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DataCorrupt(f"shard {url}: the .{label_key} label of sample {key} is not an integer "
                          f"({entry['label'][:20]!r}) — write the class index as text") from None
    if not 0 <= label < MAX_CLASSES:
        raise DataCorrupt(f"shard {url}: sample {key} has label {label} — class indices run from 0 to "
                          f"{MAX_CLASSES - 1} (MAX_CLASSES)")
    offset, size, _ = entry["image"]
    return key, int(offset), int(size), label
