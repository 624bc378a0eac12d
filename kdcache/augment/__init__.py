"""Recorded augmentations: params sampled purely from (seed, index, view), stored as numbers, replayed exactly.

``Recipe.parse("rrc+flip+cutmix:0.5")`` gives the ops; ``sample`` draws a batch of params,
``apply`` replays one view, ``mixing`` turns mixing params into soft-label weights.
"""

from __future__ import annotations

from kdcache.augment.recipe import OPS, Recipe, resize_view

__all__ = ["OPS", "Recipe", "resize_view"]
