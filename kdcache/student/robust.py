"""Robust-training settings: symmetric label noise and long-tailed subsampling of the training split.

Both follow "Knowledge Distillation Beyond Model Compression" (arXiv 2007.01922), so users can
measure how much a teacher helps a student that sees corrupted or skewed labels. Both are pure
functions of (labels, setting, seed): the same seed gives the same noisy labels and the same kept
samples on every machine. Neither touches a cache: the cache's stored labels stay the true ones,
only the labels and samples the student trains on change.
"""

from __future__ import annotations

import numpy as np

from kdcache.errors import InvalidSpec

_NOISE_STREAM, _TAIL_STREAM = 0x6E6F6973, 0x7461696C  # keep the two draws independent of each other


def long_tail_indices(labels: np.ndarray, ratio: float, num_classes: int, seed: int) -> np.ndarray:
    """Sorted sample indices kept by an exponential long-tailed profile with imbalance factor ``ratio``.

    Class ``c`` keeps ``max(1, floor(n_max · ratio^(-c/(C-1))))`` samples (never more than it has),
    ``n_max`` being the size of the largest class: class 0 keeps everything, class C-1 keeps
    ``n_max/ratio`` (the CIFAR-LT profile of Cui et al., 2019). Which samples of a class are kept
    is a seeded random choice. ``ratio=1`` keeps every sample.
    """
    if not ratio >= 1:
        raise InvalidSpec(f"--imbalance must be at least 1 (1 = balanced), got {ratio} — e.g. --imbalance 100")
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    n_max = int(counts.max())
    rng = np.random.default_rng([seed, _TAIL_STREAM])
    kept = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        exponent = c / (num_classes - 1) if num_classes > 1 else 0.0
        keep = min(len(members), max(1, int(np.floor(n_max * ratio ** -exponent + 1e-9))))
        kept.append(rng.permutation(members)[:keep])
    return np.sort(np.concatenate(kept))


def noisy_labels(
    labels: np.ndarray, fraction: float, num_classes: int, seed: int, among: np.ndarray | None = None
) -> np.ndarray:
    """A copy of ``labels`` where ``round(fraction · n)`` of the samples ``among`` (default: all) carry a
    wrong class.

    Symmetric noise: each corrupted sample gets a class drawn uniformly from the ``C-1`` classes
    other than its own, so the corrupted fraction is exactly ``fraction`` (not ``fraction·(C-1)/C``
    as when drawing from all C classes).
    """
    if not 0 <= fraction <= 1:
        raise InvalidSpec(f"--label-noise is a fraction in [0, 1], got {fraction} — e.g. --label-noise 0.2")
    if fraction > 0 and num_classes < 2:
        raise InvalidSpec("--label-noise needs at least 2 classes — drop --label-noise")
    labels = np.asarray(labels, dtype=np.int64)
    pool = np.arange(len(labels)) if among is None else np.asarray(among, dtype=np.int64)
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    flipped = rng.permutation(pool)[: round(fraction * len(pool))]
    out = labels.copy()
    out[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=len(flipped))) % num_classes
    return out
