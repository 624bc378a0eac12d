"""Every op says which stored params it never writes (Op.check_stored, Recipe.stored_problem): a shared cache is
untrusted, and a value outside an op's domain crashed, hung or silently changed a replay before (red-team of
2026-12-07). Each case here is a row that one op rejects while the op's own draws, or an import's, pass."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.augment import Recipe
from kdcache.augment.geometry import PilResizedCrop
from kdcache.augment.timm_ops import NoiseErasing, PairMix, TimmRandAugment
from kdcache.augment.torchvision_ops import PaddedCrop, PilRandAugment
from kdcache.errors import CacheCorrupt, InvalidSpec

N = 10  # samples of the dataset the rows belong to


def _rows(op, **fields):
    """One row of every field of ``op``: zeros (a step or box that did nothing; the whole image for a crop) unless
    given."""
    out = {name: np.zeros((1, *tail), dtype) for name, (tail, dtype) in op.fields().items()}
    if "rrc" in out:
        out["rrc"][:] = (0, 0, 65535, 65535)
    for name, value in fields.items():
        out[name] = np.asarray([value], out[name].dtype)
    return out


@pytest.mark.parametrize("op, fields, says", [
    (TimmRandAugment(2), {"timmra": [[99, 0], [-1, 0]]}, r"timmra op holds 99.0, outside \[-1, 14\]"),
    (TimmRandAugment(2), {"timmra": [[2.5, 0], [-1, 0]]}, "holds op 2.5, not an op index"),
    (TimmRandAugment(2), {"timmra": [[3, np.nan], [-1, 0]]}, "holds nan, not a finite number"),
    (TimmRandAugment(2), {"timmra": [[4, -1e9], [-1, 0]]}, "timmra argument holds -1000000000.0"),  # hung before
    (TimmRandAugment(2), {"timmra": [[4, 9], [-1, 0]]}, r"posterize bits holds 9.0, outside \[-1000, 8\]"),
    (NoiseErasing(1, side=40), {"noiseerase": [[0, 0, 10**9, 10**9, 1]]}, "outside \\[0, 40\\]"),
    (NoiseErasing(1, side=40), {"noiseerase": [[30, 30, 20, 20, 1]]}, r"\(bottom, right\) holds 50"),
    (NoiseErasing(1, side=40), {"noiseerase": [[-3, 0, 5, 5, 1]]}, "holds -3"),
    (NoiseErasing(1, side=40), {"noiseerase": [[0, 0, 5, 5, -1]]}, r"seed holds -1, outside \[0, 4294967295\]"),
    (PairMix(side=40), {"pairmix_partner": 12}, r"pairmix_partner holds 12, outside \[-1, 9\]"),
    (PairMix(side=40), {"pairmix_weight": 5.0}, r"pairmix_weight holds 5.0, outside \[0, 1\]"),
    (PairMix(side=40), {"pairmix_box": [30, 10, 0, 40]}, r"bottom - top, right - left\) holds -20"),
    (PairMix(side=40), {"pairmix_box": [0, 10**9, 0, 40]}, r"pairmix_box holds 1000000000, outside \[0, 40\]"),
    (PilRandAugment(2), {"pilra": [[99, 0], [-1, 0]]}, "op id 99.0 is not one of RandAugment's 14"),
    (PilRandAugment(2), {"pilra": [[-7, 0], [-1, 0]]}, "op id -7.0 is not one of"),
    (PilRandAugment(2), {"pilra": [[1, 1e308], [-1, 0]]}, "not a finite number of a sensible size"),
    (PaddedCrop(height=16, padding=4), {"padcrop": [10**9, 0]}, r"padcrop holds 1000000000, outside \[0, 16392\]"),
    (PilResizedCrop(), {"rrc": [0, 0, 0, 65535]}, r"rrc \(w, h\) holds 0, outside \[1, 65535\]"),
    (PilResizedCrop(), {"rrc": [65000, 0, 1000, 65535]}, r"rrc \(x0 \+ w, y0 \+ h\) holds 66000"),
])
def test_each_op_rejects_rows_it_never_writes(op, fields, says):
    assert op.check_stored(_rows(op), N) is None
    why = op.check_stored(_rows(op, **fields), N)
    assert why is not None and __import__("re").search(says, why), why


def test_what_imports_write_passes():
    """TinyViT's const-mode erasing stores seed -1 (it draws no noise); its increasing posterize with mmax above 10
    stores negative bits (all cleared, as Pillow up to 12.2 gave them)."""
    const = NoiseErasing(1, mode=0, side=40)
    assert const.check_stored(_rows(const, noiseerase=[[1, 2, 5, 5, -1]]), N) is None
    assert NoiseErasing(1, side=40).check_stored(_rows(NoiseErasing(1), noiseerase=[[1, 2, 5, 5, -1]]), N)
    ra = TimmRandAugment(2)
    assert ra.check_stored(_rows(ra, timmra=[[4, -4], [4, 0]]), N) is None


def test_a_view_not_mixed_stores_zeros_for_its_partner_and_passes():
    recipe = Recipe.parse("rrc+flip+mixup:1:0.5")
    params = recipe.sample(0, np.arange(N), np.zeros(N, np.int64), N)
    unmixed = params["mixup_partner"] < 0
    assert unmixed.any() and (params["partner_rrc"][unmixed] == 0).all()  # an empty box, which rrc never writes
    assert recipe.stored_problem(params, N) is None


def test_a_view_ops_partner_rows_are_checked_too_and_draws_pass():
    recipe = Recipe.parse("rrc+flip+trivial+erase+mixup:1")
    params = recipe.sample(0, np.arange(N), np.zeros(N, np.int64), N)
    assert recipe.stored_problem(params, N) is None
    params["partner_trivial"] = params["partner_trivial"].copy()
    params["partner_trivial"][0, 0] = 200
    assert "aug/partner_trivial op holds 200" in recipe.stored_problem(params, N)


def test_a_timm_seed_outside_32_bits_is_rejected():
    recipe = Recipe.parse("timm:rand-m9")
    assert "aug/timm holds -1" in recipe.stored_problem({"timm": np.array([-1], np.int64)}, N)
    assert recipe.stored_problem({"timm": np.array([2**32 - 1], np.int64)}, N) is None


def test_noise_erasing_refuses_a_normalisation_that_draws_nan():
    with pytest.raises(InvalidSpec, match="std_r must be in"):
        NoiseErasing(1, std_r=0.0)
    with pytest.raises(InvalidSpec, match="mean_g must be in"):
        NoiseErasing(1, mean_g=1e308)


def test_a_padded_crop_outside_its_image_is_damage_at_replay():
    from PIL import Image

    with pytest.raises(CacheCorrupt, match=r"padcrop offset \(30, 0\) of a 16x16 crop lies outside the 24x24"):
        PaddedCrop(height=16, padding=4).apply_pil(Image.new("RGB", (16, 16)), {"padcrop": np.array([30, 0], np.int32)}, 16)


def test_a_tinyvit_magnitude_whose_draws_no_op_stores_is_refused_at_import():
    from kdcache.interop.tinyvit_draws import RandAugmentConfig

    assert RandAugmentConfig.parse("rand-m30-mmax1000-inc1").max == 1000  # real configs: m at most 30
    with pytest.raises(ValueError, match="max 40000 is above 1000"):
        RandAugmentConfig.parse("rand-m9-mmax40000-inc1")
