"""Image folders (``imagefolder:PATH``): ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (or ``test/``),
decoded on access. The train split is kept in a seeded shuffle, so that a block of samples mixes classes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from kdcache.data.builtin import SPLIT_SEED
from kdcache.data.images import GRAY_MEAN, GRAY_MODES, GRAY_STD, RGB_MEAN, RGB_STD, FolderImageSet, Source
from kdcache.data.spec import DatasetSpec
from kdcache.data.decode import UNDECODABLE, file_header
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.locations import guard

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_GRAY_SAMPLE = 256


def open_folder(spec: DatasetSpec) -> Source:
    path = spec.path
    root = Path(path).expanduser()
    guard(root, "image folder")
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
    image_size = min(_header(root / train_files[0])[1])
    step = max(len(train_files) // _GRAY_SAMPLE, 1)
    gray = all(_mode(root / f) in GRAY_MODES for f in train_files[::step][:_GRAY_SAMPLE])
    mode = "L" if gray else "RGB"
    train, test = (FolderImageSet(root, files, labels, mode) for files, labels in splits)
    return Source(spec=spec.text, train=train, test=test, num_classes=len(classes),
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
    bad = next((rel for rel, _ in found if not rel.isprintable() or _undecodable(rel)), None)
    if bad is not None:
        raise InvalidSpec(f"image folder {split_dir}: the file name {bad.encode('utf-8', 'surrogateescape')!r} is not "
                          "printable UTF-8 text, which caches and manifests record — rename it")
    return found


def _undecodable(name: str) -> bool:
    """Whether ``name`` holds bytes that are not UTF-8 (os.walk gives them as lone surrogates)."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _mode(path: Path) -> str:
    return _header(path)[0]


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    try:
        return file_header(path)
    except UNDECODABLE as exc:
        raise DataCorrupt(f"image {path} does not decode ({exc}) — restore or remove it") from None
