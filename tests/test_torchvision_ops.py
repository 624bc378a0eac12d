"""The ops that replay torchvision's own transforms (kdcache/augment/torchvision_ops.py) give the pixels those
transforms give, and a recipe may chain MixUp then CutMix with one partner (kdcache/augment/recipe.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms.autoaugment import _apply_op  # what torchvision's RandAugment calls per op

from kdcache.augment import Recipe
from kdcache.augment.autoaugment import OPS
from kdcache.augment.op import from_pil, to_pil
from kdcache.augment.torchvision_ops import NO_OP, CenterCrop, PaddedCrop, PilRandAugment, Resize, TensorRandAugment
from kdcache.errors import InvalidSpec

TV_NAMES = list(T.RandAugment()._augmentation_space(31, (20, 26)))  # torchvision's op order


def _image(channels: int = 3, height: int = 20, width: int = 26, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=gen)


def test_op_ids_follow_torchvisions_randaugment_order():
    assert [name.lower() for name in TV_NAMES] == [op.replace("_", "") for op in OPS]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("cls", [TensorRandAugment, PilRandAugment])
def test_every_recorded_randaugment_step_is_torchvisions_own(cls, channels):
    """Each of the 14 ops at a signed magnitude from torchvision's own table, on the tensor (``tvra``) or the PIL
    image (``pilra``), against ``_apply_op`` on the same kind of image."""
    image = _image(channels)
    space = T.RandAugment()._augmentation_space(31, (20, 26))
    op = cls(1)
    for index, name in enumerate(TV_NAMES):
        table, signed = space[name]
        for magnitude in ([0.0] if table.ndim == 0 else [float(table[9]), *([-float(table[30])] if signed else [])]):
            row = {op.name: np.array([[index, magnitude]])}
            want = _apply_op(to_pil(image) if op.on_pil else image, name, magnitude,
                             interpolation=T.InterpolationMode.NEAREST, fill=None)
            got = op.apply(image, row, 20)
            assert torch.equal(got, from_pil(want) if op.on_pil else want), (name, magnitude)


def test_a_skipped_randaugment_is_the_image_and_two_steps_run_in_order():
    image = _image()
    op = PilRandAugment(2)
    assert torch.equal(op.apply(image, {"pilra": np.full((2, 2), [NO_OP, 0.0])}, 20), image)
    steps = np.array([[5, 9.0], [6, -0.27]])  # rotate, then brightness
    want = _apply_op(_apply_op(to_pil(image), "Rotate", 9.0, T.InterpolationMode.NEAREST, None), "Brightness", -0.27,
                     T.InterpolationMode.NEAREST, None)
    assert torch.equal(op.apply(image, {"pilra": steps}, 20), from_pil(want))


def test_resize_centre_and_padded_crops_are_torchvisions_on_the_pil_image():
    image = _image(3, 20, 26)
    pil = to_pil(image)
    assert torch.equal(Resize(12).apply(image, {}, 12), from_pil(T.Resize(12)(pil)))  # shorter side
    assert torch.equal(Resize(12, 15, interpolation=3).apply(image, {}, 12),
                       from_pil(T.Resize((12, 15), interpolation=T.InterpolationMode.BICUBIC)(pil)))
    assert torch.equal(CenterCrop(16).apply(image, {}, 16), from_pil(T.CenterCrop(16)(pil)))
    crop = PaddedCrop(height=16, padding=4, padding_mode=2)
    assert Recipe.parse("padcrop:16:4").ops[0] == PaddedCrop(height=16, padding=4)
    want = TF.crop(TF.pad(pil, 4, 0, "reflect"), 3, 7, 16, 16)
    assert torch.equal(crop.apply(image, {"padcrop": np.array([3, 7], np.int32)}, 16), from_pil(want))


def test_a_recipe_that_resizes_needs_no_resize_first_and_must_end_at_the_view_size():
    image = _image(3, 20, 26)
    recipe = Recipe.parse("resize:16+centercrop:16")
    view = recipe.apply(image, {}, 16)
    assert torch.equal((view * 255).round().to(torch.uint8), from_pil(T.CenterCrop(16)(T.Resize(16)(to_pil(image)))))
    assert recipe.source_box({}) is None  # the resize sees the whole image at its own size: no reduced decode
    with pytest.raises(InvalidSpec, match="renders 16x20 views, the view size is 16x16"):
        Recipe.parse("resize:16").apply(image, {}, 16)


def test_replay_only_ops_cannot_be_sampled():
    for spec in ("padcrop:16:4", "tvra", "rrc+pilra:2"):
        with pytest.raises(InvalidSpec, match="only replay params imported"):
            Recipe.parse(spec).sample(0, np.arange(4), np.zeros(4, np.int64), 4)


def test_mixup_then_cutmix_share_one_partner_and_keep_mixups_own_draws():
    chain, alone = Recipe.parse("rrc+flip+mixup:1:0.5+cutmix:0.5"), Recipe.parse("rrc+flip+mixup:1:0.5")
    n, views = 40, 3
    idx, view = np.repeat(np.arange(n), views), np.tile(np.arange(views), n)
    params, single = chain.sample(7, idx, view, n), alone.sample(7, idx, view, n)
    for key in ("mixup_partner", "mixup_lam", "rrc", "flip"):
        assert np.array_equal(params[key], single[key]), key
    both = (params["mixup_partner"] >= 0) & (params["cutmix_partner"] >= 0)
    only_cut = (params["mixup_partner"] < 0) & (params["cutmix_partner"] >= 0)
    assert both.any() and only_cut.any()
    assert (params["mixup_partner"][both] == params["cutmix_partner"][both]).all()
    partner, lam = chain.mixing(params)
    assert np.array_equal(partner, np.maximum(params["mixup_partner"], params["cutmix_partner"]))
    assert np.allclose(lam, params["mixup_lam"] * params["cutmix_lam"])
    images = [_image(3, 24, 30, seed=s) for s in range(n)]
    j = int(np.flatnonzero(both)[0])
    row = {k: v[j] for k, v in params.items()}
    cut = Recipe.parse("rrc+flip+cutmix:0.5")
    mixed = Recipe.parse("rrc+flip+mixup:1:0.5").apply(images[idx[j]], row, 16, partner=images.__getitem__)
    other = Recipe.parse("rrc+flip").apply(images[int(partner[j])], {k[len("partner_"):]: v for k, v in row.items()
                                                                     if k.startswith("partner_")}, 16)
    want = cut.ops[-1].mix(mixed, other, row)
    assert torch.equal(chain.apply(images[idx[j]], row, 16, partner=images.__getitem__), want)
