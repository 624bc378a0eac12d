"""TinyViT's pair2 mixing: which sample each one was mixed with in an epoch, and how the pair was mixed.

Follows microsoft/Cream 4a13c40, TinyViT: with mixing on, ``data/sampler.py`` ``MyDistributedSampler`` (seed 0,
``shuffle``, ``padding``, ``pair``) shuffles with ``torch.randperm(N, Generator().manual_seed(epoch))``, pads to a
multiple of 2·W (W ranks) with the permutation's head, views it as rows of two and gives rank r rows r, r+W, ...;
batches of an even size keep each row together, and ``data/augmentation/mixup.py`` ``_mix_pair2`` mixes the two
members of a row with each other, drawing on ``Generator(PCG64(seed_a ^ seed_b))`` of their two augmentation seeds:
``_params_per_batch`` (mix or not, MixUp or CutMix, λ), then ``rand_bbox`` for CutMix. A rank's keys file lists
the keys it wrote in the order it met them, keeping the first entry of a key, which is how the import checks that
this torch reproduces the sampler the logits were saved with.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kdcache.errors import InvalidSpec


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """``AUG.MIXUP``, ``AUG.CUTMIX``, ``AUG.MIXUP_PROB`` and ``AUG.MIXUP_SWITCH_PROB``."""

    mixup: float
    cutmix: float
    prob: float = 1.0
    switch: float = 0.5


@dataclasses.dataclass(frozen=True)
class Pairing:
    """One epoch: per TinyViT index t, the rank whose row holds t's first appearance, its mate there, and
    whether the mate's saved entry in that rank belongs to that row (the mate's seed is otherwise lost)."""

    rank: np.ndarray
    mate: np.ndarray
    whole: np.ndarray


def sampler_rows(n: int, epoch: int, world: int) -> np.ndarray:
    """The padded permutation as rows of two ``[total / 2, 2]`` (MyDistributedSampler with ``pair``)."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).numpy()
    total = math.ceil(n / (2 * world)) * 2 * world
    padded = np.concatenate([perm, perm[: total - n]]) if total - n <= n else np.resize(perm, total)
    return padded.reshape(-1, 2)


def pairing(n: int, epoch: int, world: int, keys: list[np.ndarray], where: str) -> Pairing:
    """The pairs of one epoch; InvalidSpec where a rank's keys are not the first appearances this torch's sampler
    gives (logits saved with another torch, another world size or another dataset)."""
    rows = sampler_rows(n, epoch, world)
    rank, mate, whole = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n, bool)
    for r in range(world):
        mine = rows[r::world]
        seq = mine.reshape(-1)
        _, first = np.unique(seq, return_index=True)
        order = np.sort(first)
        if len(keys[r]) != len(order) or not np.array_equal(keys[r], seq[order]):
            raise InvalidSpec(f"{where}: rank {r}'s keys are not the order TinyViT's sampler gives with this torch "
                              f"(torch.randperm seeded {epoch}, {world} ranks, pairs) — import with the torch the logits "
                              "were saved with, and the --dataset they were saved for")
        first_row = np.full(n, -1, np.int64)
        first_row[seq[order]] = order // 2
        for q, (a, b) in enumerate(mine.tolist()):
            for t, m in ((a, b), (b, a)):  # t's first row in this rank; a row whose mate's entry is its own wins
                if first_row[t] == q and (rank[t] < 0 or (not whole[t] and first_row[m] == q)):
                    rank[t], mate[t], whole[t] = r, m, first_row[m] == q
    return Pairing(rank, mate, whole)


def pair_params(seed_a: int, seed_b: int, mix: MixConfig, side: int) -> tuple[float, bool, tuple[int, int, int, int]]:
    """(λ, CutMix?, box (top, bottom, left, right) in pixels of a side x side view) that ``_mix_pair2`` draws for
    the pair; λ 1 for a pair not mixed, the box's λ corrected to its area as ``cutmix_bbox_and_lam`` does."""
    rng = np.random.Generator(np.random.PCG64(int(seed_a) ^ int(seed_b)))
    lam, cut = 1.0, False
    if rng.random(()) < mix.prob:
        if mix.mixup > 0 and mix.cutmix > 0:
            cut = bool(rng.random(()) < mix.switch)
            lam = float(rng.beta(mix.cutmix, mix.cutmix) if cut else rng.beta(mix.mixup, mix.mixup))
        elif mix.mixup > 0:
            lam = float(rng.beta(mix.mixup, mix.mixup))
        else:
            cut, lam = True, float(rng.beta(mix.cutmix, mix.cutmix))
    if lam == 1.0 or not cut:
        return lam, False, (0, 0, 0, 0)
    size = int(side * np.sqrt(1 - lam))
    cy = min(int(rng.random() * side), side - 1)  # np_random.randint(0, side): aug_random's randint(0, side - 1)
    cx = min(int(rng.random() * side), side - 1)
    top, bottom = int(np.clip(cy - size // 2, 0, side)), int(np.clip(cy + size // 2, 0, side))
    left, right = int(np.clip(cx - size // 2, 0, side)), int(np.clip(cx + size // 2, 0, side))
    return 1.0 - (bottom - top) * (right - left) / float(side * side), True, (top, bottom, left, right)
