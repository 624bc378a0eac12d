"""Hugging Face ``datasets`` as a dataset source: ``hfds:PATH[:SPLIT][?image=COL&label=COL]``.

PATH is a folder written by ``save_to_disk`` (a ``DatasetDict`` with a train and a validation or test
split) or a dataset the local Hugging Face cache already holds; it is opened offline, never downloaded.
The image column is the first ``Image`` feature and the label column the first ``ClassLabel`` one
(their names can be given), and the class names are the ``ClassLabel``'s. Images are read as their
stored bytes and decoded by kdcache, so every source shares one decode path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcache.data.decode import UNDECODABLE, Reduce, decode_bytes, header
from kdcache.data.images import MAX_CLASSES, ImageSet, Source, file_statistics, read_only_labels
from kdcache.data.spec import DatasetSpec
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.extras import require
from kdcache.locations import guard

TEST_SPLITS = ("validation", "test", "val")


def _datasets():
    """The datasets package, imported offline (it reads these at import; a value the user set is kept)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = require("datasets", "hfds", "hfds: data")
    return datasets


def _load(path: str) -> Any:
    """The DatasetDict at ``path``: a save_to_disk folder, else the local HF cache, offline."""
    datasets = _datasets()
    folder = Path(path).expanduser()
    guard(folder, "hfds folder")
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        try:
            return datasets.load_from_disk(str(folder))
        except Exception as exc:  # noqa: BLE001 - arrow, JSON and schema errors all mean a damaged folder
            reason = (str(exc).strip().splitlines() or [""])[0][:160]
            raise DataCorrupt(f"Hugging Face dataset {path} cannot be read ({type(exc).__name__}: {reason}) — its "
                              "files (state.json, dataset_info.json, *.arrow) are damaged; save it again") from None
    try:
        return datasets.load_dataset(str(folder) if folder.exists() else path)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for "not here"
        raise MissingData(f"no Hugging Face dataset at {path} (not a save_to_disk folder, not in the local HF "
                          f"cache: {str(exc).splitlines()[0][:120]}) — save it with "
                          "DatasetDict.save_to_disk(PATH) first (kdcache never downloads)") from None


def _columns(features: Any, options: dict[str, str], spec: str) -> tuple[str, str]:
    datasets = _datasets()
    image = options.get("image") or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label = options.get("label") or next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    for what, column in (("image", image), ("label", label)):
        if column is None or column not in features:
            raise InvalidSpec(f"dataset {spec} has no {what} column{f' {column!r}' if column else ''} (columns: "
                              f"{', '.join(features)}) — name it with ?{what}=COLUMN")
    return image, label


class HfImageSet(ImageSet):
    """One split of a Hugging Face dataset, its images read as stored bytes and decoded on access."""

    def __init__(self, dataset: Any, image: str, labels: np.ndarray, mode: str, where: str) -> None:
        self.dataset = dataset.cast_column(image, _datasets().Image(decode=False))
        self.image = image
        self.labels = read_only_labels(labels)
        self.mode = mode
        self.place = where

    def where(self, i: int) -> str:
        return f"row {i} of dataset {self.place}"

    def read(self, i: int, what: Callable[[bytes], Any]) -> Any:
        """``what`` of row ``i``'s stored image bytes; DataCorrupt naming the row when they do not decode."""
        cell = self.dataset[int(i)][self.image]
        if not isinstance(cell, dict) or (cell.get("bytes") is None and not cell.get("path")):
            raise DataCorrupt(f"dataset {self.place}: row {i} has no image — fill it, or drop that row")
        try:
            data = cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()
        except OSError as exc:
            raise DataCorrupt(f"dataset {self.place}: the image file of row {i} cannot be read ({exc.strerror}) — "
                              "restore it") from None
        try:
            return what(data)
        except UNDECODABLE as exc:
            raise DataCorrupt(f"dataset {self.place}: the image of row {i} does not decode ({exc}) — fix or drop "
                              "that row") from None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load(i), int(self.labels[i])

    def load(self, i: int, reduce: Reduce | None = None) -> torch.Tensor:
        def decoded(data: bytes) -> torch.Tensor:
            self.checked(i, data)
            return decode_bytes(data, self.mode, reduce)

        return self.read(i, decoded)


def _labels(split: Any, label: str, where: str) -> np.ndarray:
    """The label column as int64; DataCorrupt naming the first row without a class index."""
    values = np.asarray(split.with_format("numpy", columns=[label])[label], dtype=object).reshape(len(split), -1)
    numbers = np.full(len(values), -1.0)
    for i, row in enumerate(values):
        cell = row[0] if len(row) == 1 else None  # a list of labels is no class index
        if isinstance(cell, (int, float, np.integer, np.floating)) and not isinstance(cell, bool):
            numbers[i] = float(cell)
    bad = np.flatnonzero(~np.isfinite(numbers) | (numbers < 0) | (numbers != np.round(numbers))
                         | (numbers >= MAX_CLASSES)).tolist()
    if bad:
        raise DataCorrupt(f"dataset {where}: row {bad[0]} has no class label (the column must hold class indices "
                          f"from 0 to {MAX_CLASSES - 1}, one per row) — fill it, or choose the label column with "
                          "?label=COLUMN")
    return numbers.astype(np.int64)


def open_hfds(spec: DatasetSpec) -> Source:
    """The source ``hfds:…``: the train split and the first of validation/test/val beside it."""
    path, train_name, options = spec.path, spec.name, dict(spec.options)
    loaded = _load(path)
    splits = dict(loaded) if hasattr(loaded, "keys") else {}
    if train_name not in splits:
        raise MissingData(f"dataset {path} has no split {train_name!r} (it has: {', '.join(splits) or 'one unnamed'})"
                          " — save a DatasetDict with train and validation splits, or name the split hfds:PATH:SPLIT")
    test_name = next((s for s in TEST_SPLITS if s in splits and s != train_name), None)
    if test_name is None:
        raise MissingData(f"dataset {path} has no validation or test split beside {train_name!r} — add one "
                          "(kdcache evaluates on it)")
    train, test = splits[train_name], splits[test_name]
    for name, split in ((train_name, train), (test_name, test)):
        if len(split) == 0:
            raise MissingData(f"dataset {path} has no rows in its {name!r} split — add some")
    image, label = _columns(train.features, options, spec.text)
    labels = {name: _labels(splits[name], label, f"{path}:{name}") for name in (train_name, test_name)}
    feature = train.features[label]
    top = int(max(v.max() for v in labels.values()))
    names = (tuple(feature.names) if isinstance(feature, _datasets().ClassLabel)
             else tuple(str(k) for k in range(top + 1)))
    if top >= len(names):
        raise DataCorrupt(f"dataset {path}: a row has label {top}, but its ClassLabel names {len(names)} classes — fix "
                          "the labels or the ClassLabel's names")
    first_mode, side = HfImageSet(train, image, labels[train_name], "", f"{path}:{train_name}").read(0, header)
    mode, channels, mean, std = file_statistics(first_mode)
    return Source(spec=spec.text, train=HfImageSet(train, image, labels[train_name], mode, f"{path}:{train_name}"),
                  test=HfImageSet(test, image, labels[test_name], mode, f"{path}:{test_name}"),
                  num_classes=len(names), channels=channels, image_size=side, mean=mean, std=std,
                  classes=names, fingerprint=_fingerprint(train.features, {train_name: train, test_name: test},
                                                          labels, image, label))


def _fingerprint(features: Any, splits: dict[str, Any], labels: dict[str, np.ndarray], image: str, label: str) -> str:
    """sha256 of the features, and per split its rows, labels, stored files (name, size) and HF's own
    fingerprint of its content: the data, without reading every image."""
    digest = hashlib.sha256(f"hfds image={image} label={label}\n".encode())
    digest.update(json.dumps(features.to_dict(), sort_keys=True, default=str).encode())
    for name, split in splits.items():
        files = [(os.path.basename(f["filename"]), os.path.getsize(f["filename"])) for f in split.cache_files]
        digest.update(f"\n{name} {split.num_rows} {getattr(split, '_fingerprint', '')} {files}\n".encode())
        digest.update(labels[name].astype("<i8").tobytes())
    return f"sha256:{digest.hexdigest()}"
