"""The grammar of dataset specs, parsed once into a frozen :class:`DatasetSpec` without importing torch, so
a wrong ``--dataset`` (its query too) is reported at once; kdcache/data/__init__.py opens what it names.

``mnist5k``, ``digits``, ``fake:N[:C[:S]]``, ``imagefolder:PATH``, ``torchvision:NAME:ROOT``,
``wds:PATTERN[?image=…&label=…&val=PATTERN]``, ``hfds:PATH[:SPLIT][?image=COL&label=COL]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from kdcache.errors import InvalidSpec

TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
                    "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}
PATTERNS = ("mnist5k", "digits", "fake:N[:C[:S]]", "imagefolder:PATH", "torchvision:NAME:ROOT",
            "wds:PATTERN[?image=…&label=…&val=PATTERN]", "hfds:PATH[:SPLIT][?image=…&label=…]")
KINDS = ("mnist5k", "digits", "fake", "imagefolder", "torchvision", "wds", "hfds")
WDS_IMAGE_KEYS = ("jpg", "png", "webp")
WDS_LABEL_KEY = "cls"
#: The most shards a brace pattern may name (ImageNet-21k in 1 GB shards is about 1,300).
MAX_SHARDS = 1_000_000
_HF_SPLIT = re.compile(r"^[A-Za-z_][\w.-]*$")
_BRACE = re.compile(r"\{([^{}]*)\}")
_WDS_HELP = "use wds:PATTERN[?image=jpg,png,webp&label=cls&val=PATTERN]"
_HF_HELP = "use hfds:PATH[:SPLIT][?image=COL&label=COL]"


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec. ``text`` is its canonical form: the source's ``spec``, recorded in manifests.

    ``path`` is the folder (imagefolder, hfds), the root (torchvision) or the train shard pattern (wds);
    ``name`` the torchvision dataset class or the hfds train split; ``sizes`` fake's (N, C, S);
    ``options`` the query: wds ``image`` (member extensions), ``label`` and ``val``; hfds ``image`` and
    ``label`` (column names).
    """

    kind: str
    text: str
    path: str = ""
    name: str = ""
    sizes: tuple[int, ...] = ()
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    @property
    def image_keys(self) -> tuple[str, ...]:
        """wds: the image member extensions, in order of preference."""
        raw = self.option("image", ",".join(WDS_IMAGE_KEYS)) or ""
        return tuple(k for k in (k.strip().lower() for k in raw.replace(";", ",").split(",")) if k)

    @property
    def label_key(self) -> str:
        """wds: the label member's extension."""
        return (self.option("label", WDS_LABEL_KEY) or WDS_LABEL_KEY).lower()

    def __str__(self) -> str:
        return self.text

    def local_root(self) -> str | None:
        """The local folder whose whole tree is the data (an image folder, whose every sub-folder is a class; a
        ``datasets`` folder): what no output may be written into. None for sources read by name (built-in
        sets, torchvision's files, shards) and for remote data."""
        if self.kind not in ("imagefolder", "hfds"):
            return None
        folder = self.path
        return None if "://" in folder and not folder.startswith("file://") else folder.removeprefix("file://")


def parse(spec: str | DatasetSpec) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``spec``; InvalidSpec, in one line, for anything else."""
    if isinstance(spec, DatasetSpec):
        return spec
    if not isinstance(spec, str):
        raise InvalidSpec(f"a dataset spec is text, got {type(spec).__name__} — use one of: {', '.join(PATTERNS)}")
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "imagefolder" and rest:
        return DatasetSpec(kind, f"imagefolder:{rest}", path=rest)
    if kind in ("mnist5k", "digits") and not rest:
        return DatasetSpec(kind, kind)
    if kind == "fake" and rest:
        n, c, s = fake_params(text, rest)
        parts = (n, c, s) if s != 32 else (n, c) if c != 10 else (n,)
        return DatasetSpec(kind, "fake:" + ":".join(map(str, parts)), sizes=(n, c, s))
    if kind == "torchvision" and rest:
        name, _, root = rest.partition(":")
        if name.lower() not in TORCHVISION_SETS or not root:
            raise InvalidSpec(f"unknown torchvision dataset spec {text!r} — use torchvision:NAME:ROOT with NAME one "
                              f"of {', '.join(TORCHVISION_SETS.values())}")
        return DatasetSpec(kind, f"torchvision:{TORCHVISION_SETS[name.lower()]}:{root}", path=root,
                           name=TORCHVISION_SETS[name.lower()])
    if kind == "wds" and rest:
        return _wds(text, rest)
    if kind == "hfds" and rest:
        return _hfds(text, rest)
    raise InvalidSpec(f"unknown dataset {text!r} — use one of: {', '.join(PATTERNS)}")


def fake_params(spec: str, rest: str) -> tuple[int, int, int]:
    """``N[:C[:S]]`` -> (N, C, S) with defaults C=10, S=32, checked."""
    try:
        values = [int(p) for p in rest.split(":")]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or min(values) <= 0:
        raise InvalidSpec(f"bad dataset spec {spec!r} — use fake:N[:C[:S]] with positive "
                          "integers N images, C classes (10), side S (32), e.g. fake:64")
    n, c, s = values + [10, 32][len(values) - 1:]
    return n, c, s


def _query(text: str, rest: str, allowed: set[str], help_: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    where, _, query = rest.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    keys = [k for k, _ in pairs]
    unknown = sorted(set(keys) - allowed)
    if unknown or not where:
        what = f"unknown option {unknown[0]!r}" if unknown else "no path"
        raise InvalidSpec(f"bad dataset spec {text!r}: {what} — {help_}")
    if len(set(keys)) != len(keys):
        raise InvalidSpec(f"bad dataset spec {text!r}: an option is given twice — {help_}")
    if any(not v.strip() for _, v in pairs):
        raise InvalidSpec(f"bad dataset spec {text!r}: an option has no value — {help_}")
    return where, tuple(pairs)


def _wds(text: str, rest: str) -> DatasetSpec:
    pattern, options = _query(text, rest, {"image", "label", "val"}, _WDS_HELP)
    spec = DatasetSpec("wds", text, path=pattern, options=options)
    if not spec.image_keys:
        raise InvalidSpec(f"bad dataset spec {text!r}: ?image= names no extension — {_WDS_HELP}")
    for name in (pattern, spec.option("val")):
        if name is not None:
            count_braces(name)
    return spec


def _hfds(text: str, rest: str) -> DatasetSpec:
    where, options = _query(text, rest, {"image", "label"}, _HF_HELP)
    path, sep, split = where.rpartition(":")
    if not sep or not path or not _HF_SPLIT.match(split):
        path, split = where, "train"
    return DatasetSpec("hfds", text, path=path, name=split, options=options)


def count_braces(pattern: str) -> int:
    """How many names a brace pattern expands to; InvalidSpec for an empty or descending range, or more
    than :data:`MAX_SHARDS`."""
    total = 1
    for body in _BRACE.findall(pattern):
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numeric:
            first, last = (int(v) for v in numeric.groups())
            if last < first:
                raise InvalidSpec(f"brace range {{{body}}} in {pattern!r} is empty (it counts down) — write "
                                  f"{{{numeric.group(2)}..{numeric.group(1)}}}")
            total *= last - first + 1
        else:
            total *= len(body.split(","))
        if total > MAX_SHARDS:
            raise InvalidSpec(f"{pattern!r} names more than {MAX_SHARDS:,} shards (MAX_SHARDS) — check its brace "
                              "ranges")
    return total


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept); ``{x,y}`` lists."""
    count_braces(pattern)
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
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
    return [out for value in values for out in _expand(head + value + tail)]
