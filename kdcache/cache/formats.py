"""Manifest format versions: the keys each version holds, and the reader that brings an older manifest
into today's form, so a cache made by an earlier release trains, verifies and grows with this one.

A manifest is read through :func:`normalise`, which fills what an older writer left out with the value
that writer used (never a guess); ``kdcache upgrade`` (kdcache/cache/upgrade.py) writes the result back.
:data:`KEYS` pins every key path a version may hold: a change to the keys the code writes without a new
version and a reader for the old form fails tests/cache/test_formats.py. docs/format.md §Versions is
the table of what each version added.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

FORMAT_VERSION = 5

#: Subtrees whose inner keys are owned elsewhere: augmentation ops carry their own op version
#: (kdcache/augment), provenance is free text, and ``imported`` holds what another system's files said of
#: themselves (kdcache/interop). A path below them is not checked.
_OPAQUE_2 = ("recipe.augment", "recipe.he_extra.augment", "provenance")
OPAQUE = (*_OPAQUE_2, "imported")

_CONFIG = ("augment batch_size break_lock chunk_samples class_map compile dataset device energy_t ensemble "
           "extra_views features keep_members logit_dtype logits out precision progress rebuild seed sharded "
           "teacher teacher_norm teacher_size views wait weights workers").split()
_ARRAY_ENTRY = ("codec", "dtype", "logical_dtype", "name", "tail")

#: Every key path a manifest of version 2 may hold (``[]`` marks the items of a list of objects).
KEYS_2 = frozenset([
    *_OPAQUE_2, "cache_id", "completed", "format_version", "status",
    *(f"config.{k}" for k in _CONFIG),
    *(f"dataset.{k}" for k in ("channels", "classes", "fingerprint", "num_classes", "num_samples", "spec", "split")),
    *(f"he.{k}" for k in ("chunk_samples", "samples", "shard_samples", "threshold_energy", "views")),
    *(f"he.arrays[].{k}" for k in _ARRAY_ENTRY),
    *(f"history[].{k}" for k in ("cache_id", "previous_id", "kdcache", "host", "time",
                                 "views", "features", "teachers", "format")),
    *(f"layout.{k}" for k in ("chunk_samples", "every_chunk", "num_shards", "shard_samples", "sharded")),
    *(f"layout.arrays[].{k}" for k in _ARRAY_ENTRY),
    "outputs.energy.temperatures", "outputs.features", "outputs.precision",
    *(f"outputs.features[].{k}" for k in ("array", "dtype", "layer", "mode", "shape")),
    *(f"outputs.logits.{k}" for k in ("count_dtype", "draws", "dtype", "index_dtype", "k", "mode", "rng.stream",
                                      "temperature", "values", "width")),
    "outputs.members.arrays", "outputs.members.dtype",
    *(f"recipe.{k}" for k in ("crop_pct", "input_size", "interpolation", "mean", "seed", "std", "views")),
    *(f"recipe.he_extra.{k}" for k in ("energy_temperature", "fraction", "op", "view_base", "views")),
    "teacher.ensemble", "teacher.class_map.indices", "teacher.class_map.teacher_classes",
    *(f"teacher.members[].{k}" for k in ("sha256", "spec", "tag", "weights")),
])

#: Version 3 adds the per-shard record of a sharded source (``wds:``), ``dataset.parts``, and the reduced
#: JPEG decode, ``recipe.decode`` (written only when not ``full``).
KEYS_3 = KEYS_2 | {"dataset.parts[].name", "dataset.parts[].samples", "dataset.parts[].sha256", "recipe.decode",
                   "config.decode"}

#: Version 4 adds ``imported``: the format, version and description of the files a cache was imported from
#: (``kdcache import``); such a cache has no ``config``, since no precompute made it.
KEYS_4 = KEYS_3 | {"imported"}

#: Version 5 binds a cache to its place and its inputs: ``layout.bound`` (every per-view array keeps its chunks'
#: digests, ``digests/<array>``) and ``layout.inputs`` (``crc32c``: the crc32c of every source image the teacher
#: read, ``inputs/crc32c``; written by precompute).
KEYS_5 = KEYS_4 | {"layout.bound", "layout.inputs"}

#: Version 1 (kdcache 0.1.0 up to 2026-12-02) held version 2's keys, some of them only from a later
#: commit on, and ``config.he_extra``, the old name of ``config.extra_views``.
KEYS = {1: KEYS_2 | {"config.he_extra"}, 2: KEYS_2, 3: KEYS_3, 4: KEYS_4, 5: KEYS_5}

# What format-1 writers used where they recorded nothing (each is the behaviour of that code).
_V1_DEFAULTS = {
    "recipe": {"interpolation": "bilinear", "crop_pct": 0.875},  # antialiased bilinear resize; eval crop 224/256
    "outputs": {"precision": "fp32"},  # the teacher ran in float32 before --precision existed
    "config": {"class_map": None, "teacher_norm": None, "rebuild": False, "compile": False},
}
_V1_HE_CODEC = "blosc-zstd:5"  # the extra-view arrays' codec before the manifest named it


def key_paths(manifest: Mapping[str, Any]) -> set[str]:
    """The key paths of ``manifest`` (``a.b``, ``list[].key``), stopping at the :data:`OPAQUE` subtrees."""
    out: set[str] = set()

    def walk(obj: Any, prefix: str) -> None:
        if prefix in OPAQUE:
            out.add(prefix)
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(obj, list) and any(isinstance(item, Mapping) for item in obj):
            for item in obj:
                walk(item, prefix + "[]")
        else:
            out.add(prefix)

    walk(manifest, "")
    return out


def check_keys(manifest: Mapping[str, Any], version: int, where: str) -> None:
    """CacheCorrupt when ``manifest`` holds a key its format version does not have: an edited manifest."""
    from kdcache.errors import CacheCorrupt

    extra = sorted(key_paths(manifest) - KEYS[version])
    if extra:
        raise CacheCorrupt(f"{where} holds {extra[0]!r}, which no format-{version} manifest has — it was edited or "
                           "damaged; rebuild the cache with precompute --rebuild")


#: The largest view side a manifest may ask for (the ops' own bound): a forged one would render views of
#: 100,000 px, tens of GB each.
MAX_INPUT_SIZE = 8192


def check_shape(manifest: Mapping[str, Any], where: str) -> None:
    """CacheCorrupt unless the values every reader relies on have the types and ranges a writer gives them."""
    from kdcache.errors import CacheCorrupt

    def count(*path: str) -> bool:
        node: Any = manifest
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        most = MAX_INPUT_SIZE if path == ("recipe", "input_size") else float("inf")
        return isinstance(node, int) and not isinstance(node, bool) and 1 <= node <= most

    wanted = [("dataset", "num_samples"), ("dataset", "num_classes"), ("recipe", "views"), ("recipe", "input_size"),
              ("layout", "chunk_samples"), ("layout", "shard_samples"), ("layout", "num_shards")]
    bad = next((".".join(p) for p in wanted if not count(*p)), None)
    arrays = manifest.get("layout", {}).get("arrays") if isinstance(manifest.get("layout"), Mapping) else None
    if bad is None and not (isinstance(arrays, list) and all(
            isinstance(a, Mapping) and isinstance(a.get("name"), str) and isinstance(a.get("dtype"), str)
            and isinstance(a.get("tail"), list) and all(isinstance(t, int) and t >= 0 for t in a["tail"])
            for a in arrays)):
        bad = "layout.arrays"
    logits = manifest.get("outputs", {}).get("logits") if isinstance(manifest.get("outputs"), Mapping) else None
    if bad is None and not (isinstance(logits, Mapping) and logits.get("mode") in ("dense", "topk", "sampled")):
        bad = "outputs.logits"
    if bad is not None:
        raise CacheCorrupt(f"{where}: {bad} is not what a writer records — the manifest was edited or damaged; "
                           "rebuild the cache with precompute --rebuild")


def stored_version(manifest: Mapping[str, Any]) -> int | None:
    """The manifest's ``format_version``, or None when it is not a version (an int from 1)."""
    version = manifest.get("format_version")
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else None


def normalise(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` in the form of :data:`FORMAT_VERSION` (a copy; the stored ``cache_id`` is kept).

    Older forms are brought forward one version at a time; a current manifest comes back equal.
    """
    out = copy.deepcopy(dict(manifest))
    version = stored_version(out) or FORMAT_VERSION
    while version < FORMAT_VERSION:
        UPGRADES[version](out)
        version += 1
    out["format_version"] = max(version, FORMAT_VERSION)
    return out


def _from_1(m: dict[str, Any]) -> None:
    """Format 1 -> 2: rename ``he_extra``, fill every key a format-1 writer of any date left out."""
    config = m.get("config")
    if isinstance(config, dict):
        if "he_extra" in config:
            config.setdefault("extra_views", config.pop("he_extra"))
        for key, value in _V1_DEFAULTS["config"].items():
            config.setdefault(key, value)
        config.setdefault("precision", m["outputs"].get("precision", "fp32"))
    for section in ("recipe", "outputs"):
        for key, value in _V1_DEFAULTS[section].items():
            m[section].setdefault(key, value)
    # Before 2026-12-02 (a31add0) a chunk equal to the fill value was not written: a missing object is no proof
    # of damage until `kdcache upgrade` has listed them all.
    m["layout"].setdefault("every_chunk", False)
    for entry in (m.get("he") or {}).get("arrays", []):
        entry.setdefault("codec", _V1_HE_CODEC)


def _from_2(m: dict[str, Any]) -> None:
    """Format 2 -> 3: ``dataset.parts`` and ``recipe.decode`` are written only for sharded sources and
    reduced decodes, which no format-2 writer had; only the config gains its field."""
    if isinstance(m.get("config"), dict):
        m["config"].setdefault("decode", "full")


def _from_3(m: dict[str, Any]) -> None:
    """Format 3 -> 4: ``imported`` is written only by ``kdcache import``, which no format-3 writer had, so a
    format-3 manifest is already a format-4 one."""


def _from_4(m: dict[str, Any]) -> None:
    """Format 4 -> 5: a format-4 cache keeps no chunk digests and no crc32c of its inputs; the absent keys say
    so (``layout.bound`` and ``layout.inputs`` unset), which ``info`` reports and the reads respect."""


#: version -> the step that brings a manifest of that version to the next one.
UPGRADES = {1: _from_1, 2: _from_2, 3: _from_3, 4: _from_4}
