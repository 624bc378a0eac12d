"""WebDataset tar shards as a dataset source: ``wds:PATTERN[?image=jpg,png,webp&label=cls&val=PATTERN]``.

A shard is a plain tar whose members ``<key>.<ext>`` group into samples by key (the WebDataset
convention). A cache addresses samples by index, so every sample gets one from a single scan of the
shards' member names: shard order (the expanded pattern), then member order. The scan records each
image member's byte range, so a sample is later read by one ranged read of its shard, on a local disk
or through fsspec (``s3://…``), never by reading the tar from its start. Plain ``tarfile`` over fsspec
is used instead of the ``webdataset`` package because that one streams samples in order and offers no
reads by index (docs/datasets-and-models.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qsl

import numpy as np
import torch

from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.locations import filesystem
from kdcache.image_sets import (
    UNDECODABLE,
    ImageSet,
    Reduce,
    Source,
    decode_bytes,
    file_statistics,
    header,
    read_only_labels,
)

IMAGE_KEYS = ("jpg", "png", "webp")
MERGE_GAP = 256 << 10  # members closer than this in a shard are fetched as one range
LABEL_KEY = "cls"
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = the path up to the first dot of the file name


@dataclass(frozen=True)
class WdsSpec:
    """A parsed ``wds:`` spec: the train shards, the val shards and the member extensions to read."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    image_keys: tuple[str, ...] = IMAGE_KEYS
    label_key: str = LABEL_KEY


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept); ``{x,y}`` lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        values = [str(v).zfill(width) for v in range(int(first), int(last) + 1)]
    else:
        values = body.split(",")
    return [out for value in values for out in expand_braces(head + value + tail)]


def parse_spec(rest: str) -> WdsSpec:
    """``PATTERN[?image=…&label=…&val=PATTERN]``; without ``val`` the val shards are the pattern with
    its last ``train`` replaced by ``val`` (then ``test``) when those exist."""
    pattern, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"image", "label", "val"})
    if unknown or not pattern:
        raise InvalidSpec(f"bad wds spec {rest!r} — use wds:PATTERN[?image=jpg,png,webp&label=cls&val=PATTERN]")
    image = tuple(k.strip().lower() for k in options.get("image", ",".join(IMAGE_KEYS)).replace(";", ",").split(","))
    train = tuple(expand_braces(pattern))
    if "val" not in options:
        require(train)  # a wrong pattern is named as such, not as a missing val split
    val = tuple(expand_braces(options["val"])) if "val" in options else _sibling_split(pattern)
    return WdsSpec(train, val, tuple(k for k in image if k), options.get("label", LABEL_KEY).lower())


def _sibling_split(pattern: str) -> tuple[str, ...]:
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
    """What changes when a shard does: its size and its ETag (object stores) or modification time."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise MissingData(f"shard {url} not found — check the wds: pattern (brace ranges such as "
                          "{000..146})") from None
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
    for s, url in enumerate(urls):
        found = _indexed(url, image_keys, label_key)
        for key, offset, size, label in found:
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
    last, end = "its first member", 0
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                end = member.offset_data + member.size
                parsed = _MEMBER.match(member.name) if member.isfile() else None
                if parsed is None:
                    continue
                key, ext = parsed.group(1), parsed.group(2).lower()
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                entry = samples[key]
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
    if label < 0:
        raise DataCorrupt(f"shard {url}: sample {key} has label {label} — class indices start at 0")
    offset, size, _ = entry["image"]
    return key, int(offset), int(size), label


class ShardReader:
    """Ranged reads of image members, one open file per shard and process (fsspec files are not
    fork-safe, so a DataLoader worker opens its own), read ahead so that neighbouring samples of a
    shard cost one request."""

    READAHEAD = 8 << 20

    def __init__(self, urls: tuple[str, ...]) -> None:
        self.urls = urls
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= 4:  # an epoch moves through the shards: keep the few in use open
                self._files.pop(next(iter(self._files))).close()
            fs, path = filesystem(self.urls[shard])
            f = self._files[shard] = fs.open(path, "rb", block_size=self.READAHEAD, cache_type="readahead")
        f.seek(offset)
        return f.read(size)

    def __getstate__(self) -> dict[str, Any]:
        return {"urls": self.urls}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["urls"])


@contextlib.contextmanager
def _decoding(url: str, key: str) -> Iterator[None]:
    """Turn a failed decode of sample ``key`` into one DataCorrupt line naming its shard."""
    try:
        yield
    except UNDECODABLE as exc:
        raise DataCorrupt(f"shard {url}: the image of sample {key} does not decode ({exc}) — re-create the "
                          "shard, or remove the sample") from None


class WdsImageSet(ImageSet):
    """One split of WebDataset shards, decoded on access from one ranged read per image; pickles as
    the index and the shard URLs, so DataLoader workers open their own files."""

    def __init__(self, index: ShardIndex, mode: str) -> None:
        self.index = index
        self.labels = read_only_labels(index.labels)
        self.mode = mode
        self.reader = ShardReader(index.urls)
        self.remote = any("://" in url and not url.startswith("file://") for url in index.urls)
        self._fetched: dict[int, bytes] = {}
        self._ahead: list[tuple[frozenset[int], Any]] = []  # (indices, future of their bytes)
        self._pool: Any = None

    def read_bytes(self, i: int) -> bytes:
        data = self._fetched.get(i)
        if data is not None:
            return data
        index = self.index
        return self.reader.read(int(index.shard[i]), int(index.offsets[i]), int(index.sizes[i]))

    def prefetch(self, indices: Sequence[int]) -> None:
        """Fetch the images of ``indices`` from an object store in one concurrent round: neighbouring
        members of a shard as one ranged read (a precompute batch is a few), scattered ones each on its
        own (a shuffled training batch), instead of one sequential request per image. A fetch that
        :meth:`prefetch_ahead` started for them is waited for instead."""
        if not self.remote:
            return
        wanted = frozenset(int(i) for i in indices)
        for k, (ahead, future) in enumerate(self._ahead):
            if wanted <= ahead:  # a window fetched ahead: its images stay until a later window's
                self._fetched = future.result()
                del self._ahead[:k]
                return
        self._fetched = self._fetch(wanted)

    def prefetch_ahead(self, indices: Sequence[int]) -> None:
        if not self.remote:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdcache-wds")
        wanted = frozenset(int(i) for i in indices)
        self._ahead = [*self._ahead[-1:], (wanted, self._pool.submit(self._fetch, wanted))]

    def _fetch(self, wanted: frozenset[int]) -> dict[int, bytes]:
        fetched: dict[int, bytes] = {}
        index, runs = self.index, []
        for i in sorted(wanted, key=lambda i: (index.shard[i], index.offsets[i])):
            start, end = int(index.offsets[i]), int(index.offsets[i] + index.sizes[i])
            if runs and runs[-1][0] == index.shard[i] and start - runs[-1][2] <= MERGE_GAP:
                runs[-1][2] = max(runs[-1][2], end)
                runs[-1][3].append(i)
            else:
                runs.append([index.shard[i], start, end, [i]])
        fs, _ = filesystem(index.urls[0])
        paths = [filesystem(index.urls[int(shard)])[1] for shard, *_ in runs]
        blobs = fs.cat_ranges(paths, [r[1] for r in runs], [r[2] for r in runs])
        for (_, start, _, members), blob in zip(runs, blobs):
            for i in members:
                at = int(index.offsets[i]) - start
                fetched[i] = bytes(blob[at : at + int(index.sizes[i])])
        return fetched

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fetched": {}, "_ahead": [], "_pool": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load(i), int(self.labels[i])

    def load(self, i: int, reduce: Reduce | None = None) -> torch.Tensor:
        data = self.read_bytes(i)  # a failed read is the storage's error, not a damaged image
        with _decoding(self.index.urls[int(self.index.shard[i])], self.index.keys[i]):
            return decode_bytes(data, self.mode, reduce)


def open_wds(spec: str, rest: str) -> Source:
    """The source ``wds:REST``: both splits scanned, gray or RGB from the first train image, the ImageNet
    statistics (shards are not scanned for them), classes 0..max label, and a fingerprint of every
    shard's name and (key, image size, label) list."""
    parsed = parse_spec(rest)
    train = scan(parsed.train, parsed.image_keys, parsed.label_key)
    val = scan(parsed.val, parsed.image_keys, parsed.label_key)
    if not len(train.keys) or not len(val.keys):
        empty = parsed.train[0] if not len(train.keys) else parsed.val[0]
        raise MissingData(f"the shards of wds:{rest} hold no samples ({empty} and the rest) — check the pattern "
                          "and the member extensions (?image=…, ?label=…)")
    first = WdsImageSet(train, "RGB").read_bytes(0)
    with _decoding(parsed.train[0], train.keys[0]):
        first_mode, side = header(first)
    mode, channels, mean, std = file_statistics(first_mode)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    parts = {"train": train.parts(), "val": val.parts()}
    digest = hashlib.sha256(f"wds image={','.join(parsed.image_keys)} label={parsed.label_key}\n".encode())
    for name, split in parts.items():
        for part in split:
            digest.update(f"{name}\t{part['name']}\t{part['samples']}\t{part['sha256']}\n".encode())
    return Source(spec=spec, train=WdsImageSet(train, mode), test=WdsImageSet(val, mode), num_classes=num_classes,
                  channels=channels, image_size=side, mean=mean, std=std,
                  classes=tuple(str(k) for k in range(num_classes)), fingerprint=f"sha256:{digest.hexdigest()}",
                  parts=tuple(parts["train"]))


def write_shards(source: Source, out: str, per_shard: int = 1000) -> tuple[list[str], list[str]]:
    """Write ``source``'s splits as WebDataset shards ``OUT/train-000000.tar`` … and ``OUT/val-…``: one
    ``<key>.<ext>`` image member (its file's own bytes where the source has files, else PNG) and one
    ``<key>.cls`` label per sample, in sample order. Returns the train and val shard paths."""
    written: dict[str, list[str]] = {}
    for split, images in (("train", source.train), ("val", source.test)):
        written[split] = []
        for first in range(0, len(images), per_shard):
            path = os.path.join(out, f"{split}-{first // per_shard:06d}.tar")
            os.makedirs(out, exist_ok=True)
            with tarfile.open(path + ".partial", "w") as tar:
                for i in range(first, min(first + per_shard, len(images))):
                    data, ext = _member_bytes(images, i)
                    label = b"%d" % images.labels[i]
                    for name, body in ((f"{split}{i:08d}.{ext}", data), (f"{split}{i:08d}.cls", label)):
                        info = tarfile.TarInfo(name)
                        info.size = len(body)
                        tar.addfile(info, io.BytesIO(body))
            os.replace(path + ".partial", path)
            written[split].append(path)
    return written["train"], written["val"]


def _member_bytes(images: ImageSet, i: int) -> tuple[bytes, str]:
    files = getattr(images, "files", None)
    if files is not None:  # an image folder: the file as it is, so the shards decode to the same pixels
        path = images.root / files[i]
        ext = path.suffix.lower().lstrip(".")
        return path.read_bytes(), "jpg" if ext == "jpeg" else ext
    from PIL import Image

    image, _ = images[i]
    buffer = io.BytesIO()
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue(), "png"
