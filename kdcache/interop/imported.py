"""Writing an imported cache: an ordinary kdcache cache whose teacher outputs and views came from files
another system made, shard by shard, resumable, under ``OUT/<cache id>`` like a precompute.

A format module (kdcache/interop/mldr.py, tinyvit.py) reads its files into an :class:`Import`: what the
manifest says, and a function that turns a block of samples into the cache's per-view arrays. This module
owns everything else: the manifest, the layout, the writer lock, reuse of a complete cache and the alias.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from kdcache.augment import Recipe
from kdcache.cache.arrays import ArraySpec
from kdcache.cache.claim import ClaimOptions, claim
from kdcache.cache.logits import parse_logits, target_specs
from kdcache.cache.manifest import provenance
from kdcache.data.images import Source
from kdcache.errors import DataCorrupt, InvalidSpec
from kdcache.interop.boxes import integers
from kdcache.models.preprocess import Preprocess

#: Each view's top-k values are stored as float32 log-probabilities (kdcache's top-k target; the
#: sources store probabilities): exp of a stored value cast back to the source's dtype gives its bits.
VALUE_DTYPE = "float32"
#: How far above 1 a view's stored top-k may sum: float32 softmax rounding, and float16 storage (TinyViT).
TOP_K_SUM_SLACK = 1e-2


def _numbers(values: object, where: str, what: str) -> np.ndarray:
    """``values`` as float64, refused unless each is a real number (not a bool, not text)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        return values.astype(np.float64)
    array = np.asarray(values, dtype=object).reshape(-1)
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
               for v in array):
        raise DataCorrupt(f"{where}: the {what} are not all numbers — the source is damaged")
    return np.asarray(values, dtype=np.float64)


@dataclass
class Import:
    """What a format module found: the manifest's description and a reader of per-view arrays.

    ``read(indices)`` returns, for kdcache samples ``indices`` (a contiguous block), every per-view array
    ``name -> [n, views, ...]``: ``topk/values``, ``topk/indices`` and ``aug/<field>`` of ``recipe``.
    """

    format: str
    about: dict[str, Any]  # the manifest's ``imported`` section: version, source path, what the files say
    recipe: Recipe
    views: int
    k: int
    preprocess: Preprocess
    teacher: str  # what the source says its teacher was (a name), for the teacher entry's tag
    sha256: str  # "sha256:<hex>" of what identifies the source's outputs (its configuration, its index)
    source_path: str
    read: Callable[[np.ndarray], dict[str, np.ndarray]] = field(repr=False)
    precision: str = "unknown"
    notes: list[str] = field(default_factory=list)  # what the import ignored as the source's own reader does
    close: Callable[[], None] = field(default=lambda: None, repr=False)  # frees what ``read`` holds (temporary files)


@dataclass
class ImportResult:
    path: str  # the cache, OUT/<cache id>: what `train --cache` takes
    cache_id: str
    reused: bool
    views: int
    seconds: float
    alias: str | None = None
    notes: list[str] = field(default_factory=list)


def manifest_of(found: Import, source: Source) -> dict[str, Any]:
    """The manifest of the cache ``found`` describes, for the train split of ``source``."""
    return {
        "teacher": {"members": [{"spec": f"imported:{found.format}", "sha256": found.sha256,
                                 "weights": found.source_path, "tag": found.teacher}], "ensemble": None},
        "dataset": source.manifest_entry(),
        "recipe": {"views": found.views, "seed": 0, "augment": found.recipe.to_manifest(),
                   **found.preprocess.to_manifest()},
        "outputs": {"precision": found.precision,
                    "logits": _top_k_entry(found, source),
                    "energy": {"temperatures": []}, "features": []},
        "imported": {"format": found.format, **found.about},
        "provenance": provenance(),
    }


def _top_k_entry(found: Import, source: Source) -> dict[str, Any]:
    if found.k > source.num_classes:
        raise InvalidSpec(f"the source keeps the top {found.k} of its teacher's classes, the dataset has "
                          f"{source.num_classes} — pass the --dataset the source was made for")
    return parse_logits(f"topk:{found.k}", source.num_classes, VALUE_DTYPE)


def array_specs(found: Import, manifest: dict[str, Any]) -> list[ArraySpec]:
    """The cache's per-view arrays: the top-k target of ``manifest`` and the recipe's ``aug/`` fields."""
    return [*target_specs(manifest["outputs"]["logits"], int(manifest["dataset"]["num_classes"])),
            *[ArraySpec(f"aug/{name}", tuple(tail), dtype) for name, (tail, dtype) in found.recipe.fields().items()]]


def write_import(found: Import, source: Source, out: str, progress: bool = True,
                 options: ClaimOptions = ClaimOptions()) -> ImportResult:
    """Write (or resume, or reuse, or with ``options.rebuild`` rewrite) the cache of ``found`` under root ``out``."""
    began = time.perf_counter()
    manifest = manifest_of(found, source)
    with claim(out, manifest, source.train.labels, array_specs(found, manifest), options) as held:
        cache = held.cache
        if held.reused:
            return ImportResult(cache.path, cache.id, True, 0, time.perf_counter() - began, held.alias, found.notes)
        specs = array_specs(found, cache.manifest)
        done = cache.shards_done()
        todo = [s for s in range(cache.num_shards) if not done[s]]
        views = 0
        total = sum(stop - start for start, stop in map(cache.shard_range, todo)) * found.views
        with tqdm(total=total, unit="view", desc=f"import {found.format}", disable=not progress, leave=False) as bar:
            for shard in todo:
                start, stop = cache.shard_range(shard)
                held.lock.check()
                arrays = found.read(np.arange(start, stop))
                cache.write_shard(shard, {spec.name: np.asarray(arrays[spec.name], spec.dtype) for spec in specs})
                views += (stop - start) * found.views
                bar.update((stop - start) * found.views)
        cache.finish()
    return ImportResult(cache.path, cache.id, False, views, time.perf_counter() - began, held.alias, found.notes)


def files_digest(files: Iterable[tuple[str, Path]], start: bytes = b"") -> str:
    """``sha256:<hex>`` over ``start`` and, per (label, file), the label's line and the file's bytes (streamed): a
    source's identity in its cache id."""
    digest = hashlib.sha256(start)
    for label, path in files:
        digest.update(f"{label}\n".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def top_k(probs: np.ndarray, ids: np.ndarray, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and class ids ``[..., k]`` as stored top-k: float32 log-probabilities in descending order
    (ties keep the source's order) and their ids (cast to the cache's index dtype when written)."""
    probs, ids = _numbers(probs, where, "probabilities"), integers(ids, where, "the class ids")
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise InvalidSpec(f"{where}: class id {int(ids.max() if ids.max() >= num_classes else ids.min())} is outside "
                          f"the dataset's {num_classes} classes — pass the --dataset the source was made for")
    if ids.size and (np.sort(ids, axis=-1)[..., 1:] == np.sort(ids, axis=-1)[..., :-1]).any():
        raise DataCorrupt(f"{where}: a view names one class twice among its top-k — the source is damaged")
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise InvalidSpec(f"{where}: the stored values are not probabilities in [0, 1] — the source is damaged")
    if (probs.sum(axis=-1) > 1 + TOP_K_SUM_SLACK).any():
        raise DataCorrupt(f"{where}: a view's top-k probabilities sum to {float(probs.sum(axis=-1).max()):.4g}, more "
                          "than 1 — the source is damaged")
    order = np.argsort(-probs, axis=-1, kind="stable")
    with np.errstate(divide="ignore"):
        values = np.log(np.take_along_axis(probs, order, axis=-1)).astype(np.float32)
    return values, np.take_along_axis(ids, order, axis=-1)


def image_sizes(source: Source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(height, width) of train images ``indices`` (``ImageSet.image_size``: from file headers where there are files)."""
    sizes = np.array([source.train.image_size(int(i)) for i in indices], dtype=np.int64).reshape(-1, 2)
    return sizes[:, 1], sizes[:, 0]


def folder_order(source: Source) -> np.ndarray:
    """kdcache's train index of each sample in the order torchvision's ImageFolder lists them (classes sorted,
    then paths), for sources that are image folders; the identity for every other source.

    Other systems index samples as ``torchvision.datasets.ImageFolder`` does, and kdcache shuffles a folder's
    train files once (kdcache/data/folder.py), so an import maps one order onto the other.
    """
    files = getattr(source.train, "files", None)
    if files is None:
        return np.arange(len(source.train), dtype=np.int64)
    labels = source.train.labels
    keys = [(int(labels[i]), *files[i].rsplit("/", 1)) for i in range(len(files))]
    return np.array(sorted(range(len(files)), key=keys.__getitem__), dtype=np.int64)
