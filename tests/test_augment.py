"""Recorded augmentations: pure sampling, exact replay from stored numbers, clear spec errors."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from torchvision.transforms.v2 import RandomResizedCrop, TrivialAugmentWide
from torchvision.transforms.v2 import functional as F

from kdcache.augment import Recipe, geometry, resize_view
from kdcache.augment.autoaugment import NUM_BINS, OPS, SIGNED, apply_op, magnitudes
from kdcache.augment.op import BOX_SCALE, box_row, pixel_span, quantise_box
from kdcache.augment.rng import Draws, _gamma_ratio, _johnk, philox4x32
from kdcache.errors import InvalidSpec, UnsupportedFormat

N = 50
SINGLE_OPS = [
    "rrc", "rrc:0.35", "flip", "trivial", "randaugment", "randaugment:3:15", "erase:1",
    "mixup", "mixup:0.4:0.5", "cutmix", "cutmix:0.5", "none",
]  # fmt: skip
COMBINED = ["rrc+flip+trivial+erase+cutmix:0.5", "rrc+flip+trivial+erase+mixup", "randaugment+erase:0.5+cutmix"]
ALL_SPECS = SINGLE_OPS + COMBINED


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Per-image ops on tiny tensors only lose from intra-op threads on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(channels: int, height: int, width: int, count: int = N) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(channels * 1000 + height * 10 + width)
    return [torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=gen) for _ in range(count)]


def _batch(recipe: Recipe, seed: int = 0, views: int = 3) -> dict[str, np.ndarray]:
    pairs = np.arange(N * views)
    return recipe.sample(seed, pairs // views, pairs % views, N)


def _row(params: dict[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
    return {k: v[j] for k, v in params.items()}


def _roundtrip_npy(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, values in params.items():
        buf = io.BytesIO()
        np.save(buf, values, allow_pickle=False)
        buf.seek(0)
        out[key] = np.load(buf, allow_pickle=False)
    return out


def test_philox_matches_random123_known_answers():
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in cases:
        got = philox4x32(tuple(np.uint64(c) for c in counter), key)
        assert tuple(int(x) for x in got) == want


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_sample_returns_exactly_the_declared_fields(spec):
    recipe = Recipe.parse(spec)
    params = _batch(recipe)
    assert set(params) == set(recipe.fields())
    for key, (tail, dtype) in recipe.fields().items():
        assert params[key].shape == (N * 3, *tail), key
        assert params[key].dtype == np.dtype(dtype), key


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_replay_from_round_tripped_params_is_bit_identical(spec):
    recipe = Recipe.parse(spec)
    images = _images(3, 36, 30)
    params = _batch(recipe)
    stored = _roundtrip_npy(params)
    for j in range(0, N * 3, 7):
        i = j // 3
        teacher_view = recipe.apply(images[i], _row(params, j), 32, partner=images.__getitem__)
        student_view = recipe.apply(images[i].clone(), _row(stored, j), 32, partner=images.__getitem__)
        assert teacher_view.dtype == torch.float32 and teacher_view.shape == (3, 32, 32)
        assert torch.equal(teacher_view, student_view)


def test_replay_through_a_zarr_cache_layout_is_bit_identical():
    recipe = Recipe.parse("rrc+flip+trivial+erase+cutmix:0.5")
    views, images = 4, _images(1, 28, 28)
    params = _batch(recipe, seed=11, views=views)
    root = zarr.group(store=zarr.storage.MemoryStore())
    for key, (tail, dtype) in recipe.fields().items():
        arr = root.create_array(f"aug/{key}", shape=(N, views, *tail), dtype=dtype, chunks=(16, views, *tail))
        arr[:] = params[key].reshape(N, views, *tail)
    for i, v in [(0, 0), (7, 3), (49, 2), (23, 1)]:
        stored = {key: root[f"aug/{key}"][i, v] for key in recipe.fields()}
        original = recipe.apply(images[i], _row(params, i * views + v), 28, partner=images.__getitem__)
        assert torch.equal(original, recipe.apply(images[i], stored, 28, partner=images.__getitem__))


@pytest.mark.parametrize(
    "spec", ["rrc+flip+trivial+erase+cutmix:0.5", "randaugment:2:9+mixup:0.2:0.5", "flip+mixup:2:0.5"]
)
def test_sample_is_pure_per_element_whatever_the_batch(spec):
    recipe = Recipe.parse(spec)
    full = _batch(recipe, seed=5, views=4)
    order = np.random.default_rng(1).permutation(N * 4)[:37]
    shuffled = recipe.sample(5, order // 4, order % 4, N)
    for key in full:
        assert full[key][order].tobytes() == shuffled[key].tobytes(), key
    for j in [0, 13, 199]:
        single = recipe.sample(5, np.array([j // 4]), np.array([j % 4]), N)
        for key in full:
            assert full[key][j].tobytes() == single[key][0].tobytes(), key


@pytest.mark.slow  # a fresh interpreter importing torch takes seconds
def test_sample_is_identical_in_another_process():
    code = (
        "import numpy as np, hashlib; from kdcache.augment import Recipe;"
        "p = Recipe.parse('rrc+flip+trivial+erase+mixup').sample(3, np.arange(20), np.arange(20) % 5, 20);"
        "print(hashlib.sha256(b''.join(p[k].tobytes() for k in sorted(p))).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    here = Recipe.parse("rrc+flip+trivial+erase+mixup").sample(3, np.arange(20), np.arange(20) % 5, 20)
    assert out == hashlib.sha256(b"".join(here[k].tobytes() for k in sorted(here))).hexdigest()


def test_seeds_views_and_indices_give_different_params():
    recipe = Recipe.parse("rrc+flip")
    a = _batch(recipe, seed=0)["rrc"]
    b = _batch(recipe, seed=1)["rrc"]
    assert not np.array_equal(a, b)
    assert len({row.tobytes() for row in a}) == len(a)  # every (index, view) has its own box


def test_seed_outside_64_bits_is_rejected():
    for seed in (-1, 2**64, 1.5):
        with pytest.raises(InvalidSpec):
            Recipe.parse("flip").sample(seed, np.arange(3), np.zeros(3, dtype=np.int64), 3)


def test_rrc_boxes_are_in_range():
    recipe = Recipe.parse("rrc:0.35")
    pairs = np.arange(20000)
    box = recipe.sample(0, pairs % 1000, pairs // 1000, 1000)["rrc"] / BOX_SCALE
    x0, y0, w, h = box.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w > 0).all() and (h > 0).all()
    assert (x0 + w <= 1 + 1e-12).all() and (y0 + h <= 1 + 1e-12).all()
    assert ((w * h >= 0.35 - 1 / BOX_SCALE) & (w * h <= 1)).all()
    assert ((w / h >= 0.75 - 1e-4) & (w / h <= 4 / 3 + 1e-4)).all()  # sides >= 0.5, each within 0.5/65535
    torch.manual_seed(0)  # torchvision's sampler on a square image gives the same area distribution
    tv = [RandomResizedCrop.get_params(torch.empty(1, 500, 500), [0.35, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    tv_area = np.array([h * w for _, _, h, w in tv]) / 500**2
    assert abs(np.median(w * h) - np.median(tv_area)) < 0.02
    assert abs(np.mean(w * h) - np.mean(tv_area)) < 0.02


RRC_CASES = [
    geometry.RandomResizedCrop(),  # default scale (0.08, 1): a try fits in every one of these views
    geometry.RandomResizedCrop(min_scale=0.9, max_scale=1.0),  # 14% of views exhaust their tries: fallback
    geometry.RandomResizedCrop(min_scale=1.0, min_ratio=2.0, max_ratio=2.0),  # always the fallback, h = 1/2 centred
    geometry.RandomResizedCrop(min_scale=1.0, min_ratio=1 / 3, max_ratio=1 / 3),  # always the fallback, w = 1/3 centred
    geometry.RandomResizedCrop(min_scale=1e-12, max_scale=1e-12),  # sides of 1e-6, below one fixed-point step
]  # fmt: skip


@pytest.mark.parametrize("op", RRC_CASES, ids=lambda op: f"{op.min_scale}-{op.max_scale}-{op.min_ratio:.3g}")
def test_quantised_rrc_boxes_stay_inside_the_image_and_are_never_empty(op):
    pairs = np.arange(50_000)
    box = Recipe((op,)).sample(3, pairs % 5000, pairs // 5000, 5000)["rrc"]
    assert box.dtype == np.uint16
    x0, y0, w, h = box.astype(np.int64).T
    assert (w >= 1).all() and (h >= 1).all()
    assert (x0 + w <= BOX_SCALE).all() and (y0 + h <= BOX_SCALE).all()  # integers: x0 + w <= 1 exactly
    image = torch.zeros(1, 7, 5, dtype=torch.uint8)
    for j in range(0, len(box), 997):  # every box replays to a non-empty crop inside the image
        assert Recipe((op,)).apply(image, {"rrc": box[j]}, 4).shape == (1, 4, 4)


def test_rrc_fallback_boxes_are_centred_fixed_point():
    fallback = {
        RRC_CASES[2]: [0, 16384, BOX_SCALE, 32768],  # (1 - 1/2) / 2 * 65535 = 16383.75; 32767.5 -> even
        RRC_CASES[3]: [21845, 0, 21845, BOX_SCALE],  # 1/3 * 65535 = 21845 exactly
    }
    for op, want in fallback.items():
        box = Recipe((op,)).sample(0, np.arange(100), np.zeros(100, dtype=np.int64), 100)["rrc"]
        assert (box == np.array(want, dtype=np.uint16)).all()


def test_quantise_box_keeps_the_far_edge_inside_at_rounding_ties():
    w = (np.arange(1, 4001) + 0.5) / BOX_SCALE  # w * 65535 is a half step, as is the largest offset
    for x0 in (1 - w, np.nextafter(1 - w, 2), np.zeros_like(w)):
        q = quantise_box(x0, x0, w, w).astype(np.int64)
        assert (q[:, 0] + q[:, 2] <= BOX_SCALE).all() and (q[:, 2] >= 1).all()
        assert (np.abs(q[:, 2] / BOX_SCALE - w) <= 0.5 / BOX_SCALE + 1e-12).all()
        assert (np.abs(q[:, 0] / BOX_SCALE - x0) <= 1.5 / BOX_SCALE + 1e-12).all()  # nearest, or one back
    tiny = quantise_box(np.array([1.0]), np.array([0.3]), np.array([1e-9]), np.array([0.0]))
    assert tiny.tolist() == [[BOX_SCALE - 1, 19660, 1, 1]]


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.35, 1.0), (0.25, 0.5)])
def test_quantised_rrc_areas_stay_within_the_scale_range(scale):
    pairs = np.arange(100_000)
    recipe = Recipe((geometry.RandomResizedCrop(min_scale=scale[0], max_scale=scale[1]),))
    w, h = (recipe.sample(1, pairs % 10_000, pairs // 10_000, 10_000)["rrc"][:, 2:] / BOX_SCALE).T
    area = w * h  # rounding each side by at most 1/(2*65535) moves the area by at most 1/65535
    assert area.min() >= scale[0] - 1 / BOX_SCALE and area.max() <= scale[1] + 1 / BOX_SCALE
    assert area.min() < scale[0] + 1e-3 and area.max() > scale[1] - 1e-2  # the whole range is used
    if scale[1] * 4 / 3 <= 1:  # every first try fits, so the area is U(scale) up to the rounding
        assert abs(area.mean() - sum(scale) / 2) < 2e-3
        assert abs(np.mean(area <= scale[0] + 0.25 * (scale[1] - scale[0])) - 0.25) < 5e-3


def test_rrc_round_trip_through_storage_replays_the_documented_pixels():
    recipe = Recipe.parse("rrc")
    image = _images(3, 37, 53, 1)[0]
    first = recipe.sample(8, np.arange(N), np.full(N, 2), N)
    again = recipe.sample(8, np.arange(N)[::-1], np.full(N, 2), N)  # another batch, same views
    assert first["rrc"].tobytes() == again["rrc"][::-1].tobytes()
    root = zarr.group(store=zarr.storage.MemoryStore())
    root.create_array("aug/rrc", shape=(N, 4), dtype="uint16", chunks=(16, 4))[:] = first["rrc"]
    for j in range(0, N, 7):
        stored = root["aug/rrc"][j]
        assert stored.dtype == np.uint16 and stored.tobytes() == first["rrc"][j].tobytes()
        x0, y0, w, h = (int(q) / 65535 for q in stored)  # the decode docs/recipes.md gives
        left = min(max(math.floor(x0 * 53 + 0.5), 0), 52)
        top = min(max(math.floor(y0 * 37 + 0.5), 0), 36)
        right = min(max(math.floor((x0 + w) * 53 + 0.5), left + 1), 53)
        bottom = min(max(math.floor((y0 + h) * 37 + 0.5), top + 1), 37)
        want = F.resized_crop(image, top, left, bottom - top, right - left, [24, 24], antialias=True)
        view = recipe.apply(image, {"rrc": stored}, 24)
        assert torch.equal(view, F.to_dtype(want, torch.float32, scale=True))
        assert torch.equal(view, recipe.apply(image.clone(), {"rrc": stored.astype(np.int64)}, 24))


def test_flip_trivial_and_randaugment_choices_are_in_range():
    pairs = np.arange(4000)
    flip = Recipe.parse("flip").sample(0, pairs, pairs % 3, 4000)["flip"]
    assert set(np.unique(flip)) == {0, 1} and abs(flip.mean() - 0.5) < 0.03
    trivial = Recipe.parse("trivial").sample(0, pairs, pairs % 3, 4000)["trivial"]
    op, bin_, negate = trivial.T
    assert set(np.unique(op)) == set(range(len(OPS)))
    assert bin_.max() == NUM_BINS - 1
    signed = np.array([OPS[o] in SIGNED for o in op])
    assert not negate[~signed].any() and 0.45 < negate[signed].mean() < 0.55
    ra = Recipe.parse("randaugment:3:15").sample(0, pairs, pairs % 3, 4000)["randaugment"]
    assert ra.shape == (4000, 3, 3)
    assert set(np.unique(ra[..., 1])) == {0, 15}


def test_erase_boxes_are_in_range_and_applied_at_rate_p():
    pairs = np.arange(8000)
    box = Recipe.parse("erase:0.25").sample(0, pairs, pairs % 3, 8000)["erase"].astype(np.float64)
    on = box[:, 2] > 0
    assert abs(on.mean() - 0.25) < 0.03
    x0, y0, w, h = box[on].T
    assert ((w * h >= 0.02 - 1e-6) & (w * h <= 0.33 + 1e-6)).all()
    assert ((h / w >= 0.3 - 1e-5) & (h / w <= 3.3 + 1e-5)).all()
    assert (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    assert not box[~on].any()


def test_erase_zeroes_the_stored_box_in_every_channel():
    recipe = Recipe.parse("erase:1")
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    params = _batch(recipe)
    j = int(np.argmax(params["erase"][:, 2]))
    view = recipe.apply(image, _row(params, j), 32)
    w, h = params["erase"][j, 2:].astype(np.float64)
    assert (view == 0).all(dim=0).float().mean().item() == pytest.approx(w * h, abs=4 / 32)
    assert (view * 255).round().unique().tolist() == [0.0, 200.0]


@pytest.mark.parametrize("spec", ["mixup:0.2:0.5", "cutmix:0.5"])
def test_mixing_partners_and_lambdas_are_consistent(spec):
    recipe = Recipe.parse(spec)
    pairs = np.arange(4000)
    params = recipe.sample(2, pairs % 100, pairs // 100, 100)
    partner, lam = recipe.mixing(params)
    assert partner.dtype == np.int64 and lam.dtype == np.float32
    mixed = partner >= 0
    assert abs(mixed.mean() - 0.5) < 0.04
    assert (partner[mixed] != (pairs % 100)[mixed]).all() and partner.max() < 100
    assert (lam[~mixed] == 1).all() and ((lam >= 0) & (lam <= 1)).all()
    for key in recipe.fields():
        if key.startswith("partner_"):
            assert not params[key][~mixed].any()
    assert Recipe.parse("rrc+flip").mixing(_batch(Recipe.parse("rrc+flip")))[0].tolist() == [-1] * N * 3


def test_partner_params_depend_only_on_partner_and_view():
    recipe = Recipe.parse("rrc+flip+mixup")
    pairs = np.arange(200)
    params = recipe.sample(9, pairs % 4, pairs // 4, 4)
    seen: dict[tuple[int, int], bytes] = {}
    repeats = 0
    for j, (p, v) in enumerate(zip(params["mixup_partner"], pairs // 4)):
        key, value = (int(p), int(v)), params["partner_rrc"][j].tobytes() + params["partner_flip"][j].tobytes()
        repeats += key in seen
        assert seen.setdefault(key, value) == value
    assert repeats > 10


def test_cutmix_lambda_is_the_fraction_of_own_pixels_at_any_size():
    recipe = Recipe.parse("cutmix")
    black, white = torch.zeros(3, 30, 30, dtype=torch.uint8), torch.full((3, 30, 30), 255, dtype=torch.uint8)
    params = _batch(recipe)
    _, lam = recipe.mixing(params)
    box = params["cutmix_box"].astype(np.float64)
    assert np.array_equal(lam, (1 - box[:, 2] * box[:, 3]).astype(np.float32))
    assert ((box * 32) == np.round(box * 32)).all()  # edges on the 32-grid
    for j in range(0, N * 3, 5):
        for size in (32, 64):  # whole-pixel boxes: hard paste, exact fraction
            view = recipe.apply(black, _row(params, j), size, partner=lambda _: white)
            assert set(view.unique().tolist()) <= {0.0, 1.0}
            assert (view[0] == 1).sum().item() / size**2 == 1 - lam[j]
        view = recipe.apply(black, _row(params, j), 28, partner=lambda _: white)  # edges inside pixels
        assert view[0].mean().item() == pytest.approx(1 - lam[j], abs=1e-5)


def test_mixup_blends_the_two_views_by_lambda():
    recipe = Recipe.parse("mixup:0.4")
    black, white = torch.zeros(1, 28, 28, dtype=torch.uint8), torch.full((1, 28, 28), 255, dtype=torch.uint8)
    params = _batch(recipe)
    _, lam = recipe.mixing(params)
    for j in range(0, N * 3, 9):
        view = recipe.apply(black, _row(params, j), 28, partner=lambda _: white)
        assert torch.allclose(view, torch.full_like(view, 1 - float(lam[j])), atol=1e-6)


def test_mixed_view_without_a_partner_callable_is_an_error():
    recipe = Recipe.parse("mixup")
    params = _batch(recipe)
    with pytest.raises(ValueError, match="partner"):
        recipe.apply(_images(3, 32, 32, 1)[0], _row(params, 0), 32)


def test_mixing_needs_two_samples():
    with pytest.raises(InvalidSpec):
        Recipe.parse("cutmix").sample(0, np.array([0]), np.array([0]), 1)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 40, 24), (1, 17, 53)])
@pytest.mark.parametrize("spec", ["rrc+flip+trivial+erase+cutmix:0.5", "randaugment:4:30+mixup", "flip+trivial"])
def test_apply_handles_grey_colour_and_non_square_images(shape, spec):
    recipe = Recipe.parse(spec)
    images = _images(*shape, count=8)
    params = recipe.sample(0, np.arange(8), np.zeros(8, dtype=np.int64), 8)
    for j in range(8):
        view = recipe.apply(images[j], _row(params, j), 24, partner=images.__getitem__)
        assert view.shape == (shape[0], 24, 24) and view.dtype == torch.float32
        assert 0.0 <= view.min().item() and view.max().item() <= 1.0


@pytest.mark.parametrize("channels", [1, 3])
def test_every_autoaugment_op_matches_torchvision(channels):
    reference = TrivialAugmentWide()
    image = _images(channels, 20, 26, 1)[0]
    names = dict(zip(OPS, reference._AUGMENTATION_SPACE))  # same order as torchvision
    for op, tv_name in names.items():
        table = magnitudes(op, True, 20, 26)
        tv_table = reference._AUGMENTATION_SPACE[tv_name][0](NUM_BINS, 20, 26)
        assert (table is None and tv_table is None) or torch.equal(table, tv_table), op
        for magnitude in [0.0] if table is None else [float(table[5]), -float(table[30])]:
            if op not in SIGNED and magnitude < 0:
                continue
            want = reference._apply_image_or_video_transform(
                image, tv_name, magnitude, interpolation=reference.interpolation, fill=reference._fill
            )
            threshold = 255.0 * magnitude if op == "solarize" else magnitude  # apply_op takes levels
            assert torch.equal(apply_op(image, op, threshold), want), op


def test_one_box_replays_the_same_region_at_two_sizes():
    recipe = Recipe.parse("rrc+flip")
    y, x = torch.meshgrid(torch.linspace(0, 255, 96), torch.linspace(0, 255, 80), indexing="ij")
    image = torch.stack([y, x, (x + y) / 2]).round().to(torch.uint8)  # smooth, position-coded
    params = _batch(recipe)
    for j in range(0, N * 3, 11):
        small = recipe.apply(image, _row(params, j), 32)
        large = recipe.apply(image, _row(params, j), 64)
        assert small.shape == (3, 32, 32) and large.shape == (3, 64, 64)
        shrunk = F.resize(large, [32, 32], antialias=True)
        assert (shrunk - small).abs().mean().item() < 0.02


def test_without_rrc_the_view_is_resized_first():
    image = _images(3, 40, 24, 1)[0]
    recipe = Recipe.parse("none")
    assert recipe.fields() == {} and recipe.sample(0, np.arange(2), np.arange(2), 2) == {}
    assert torch.equal(recipe.apply(image, {}, 32), resize_view(image, 32))
    flip = Recipe.parse("flip:1")
    params = flip.sample(0, np.arange(1), np.arange(1), 1)
    assert torch.equal(flip.apply(image, _row(params, 0), 32), F.horizontal_flip(resize_view(image, 32)))


def test_resize_view_is_float_in_unit_range():
    image = _images(1, 28, 28, 1)[0]
    view = resize_view(image, 32)
    assert view.shape == (1, 32, 32) and view.dtype == torch.float32
    assert torch.equal((resize_view(image, 28) * 255).round().to(torch.uint8), image)
    with pytest.raises(ValueError):
        resize_view(image.float(), 32)


@pytest.mark.parametrize(
    "spec, says",
    [
        ("rrc+bogus", "valid ops"),
        ("cutmix+flip", "after every other op"),
        ("mixup:-1", "alpha"),
        ("", "empty"),
        ("rrc++flip", "empty op"),
        ("flip+flip", "twice"),
        ("erase+rrc", "then erase"),
        ("rrc:0", "min_scale"),
        ("rrc:abc", "not a number"),
        ("randaugment:2:31", "magnitude"),
        ("randaugment:1.5", "whole number"),
        ("flip:0.5:1", "at most 1"),
        ("cutmix:0.5:0", "p"),
    ],
)
def test_bad_specs_raise_one_line_invalid_spec(spec, says):
    with pytest.raises(InvalidSpec) as err:
        Recipe.parse(spec)
    message = str(err.value)
    assert "\n" not in message and " — " in message and says in message


@pytest.mark.parametrize(
    "spec, normal",
    [
        ("RRC:0.08 + flip", "rrc+flip"),
        ("rrc:0.35:1", "rrc:0.35"),
        ("cutmix:1:0.5", "cutmix:0.5"),
        ("cutmix:0.5:1", "cutmix:0.5:1"),
        ("mixup:0.2:1", "mixup"),
        ("randaugment:2:9", "randaugment"),
        ("erase:0.25", "erase"),
    ],
)
def test_specs_normalise_to_a_canonical_form(spec, normal):
    recipe = Recipe.parse(spec)
    assert recipe.spec == normal and Recipe.parse(normal) == recipe


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_manifest_round_trip_gives_an_equal_recipe_and_identical_samples(spec):
    recipe = Recipe.parse(spec)
    again = Recipe.from_manifest(json.loads(json.dumps(recipe.to_manifest())))
    assert again == recipe and again.spec == recipe.spec
    a, b = _batch(recipe, seed=4), _batch(again, seed=4)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_manifest_of_mixing_sampled_by_the_old_scipy_sampler_is_refused():
    for spec in ("rrc+flip+mixup", "rrc+flip+cutmix:0.5"):
        manifest = Recipe.parse(spec).to_manifest()
        assert manifest["ops"][-1]["version"] == 2
        manifest["ops"][-1]["version"] = 1
        with pytest.raises(UnsupportedFormat, match="older kdcache") as err:
            Recipe.from_manifest(manifest)
        assert "\n" not in str(err.value) and "re-run precompute" in str(err.value)


def test_manifest_of_rrc_with_float32_boxes_is_refused():
    manifest = Recipe.parse("rrc:0.35+flip").to_manifest()
    assert manifest["ops"][0]["op"] == "rrc" and manifest["ops"][0]["version"] == 2
    manifest["ops"][0]["version"] = 1  # a cache written before the box became uint16 fixed point
    with pytest.raises(UnsupportedFormat) as err:
        Recipe.from_manifest(manifest)
    message = str(err.value)
    assert "\n" not in message and "'rrc'" in message and "older kdcache" in message
    assert "op version 1, this one is 2" in message and "re-run precompute" in message


def test_manifest_from_a_newer_op_version_is_refused():
    manifest = Recipe.parse("rrc+flip").to_manifest()
    manifest["ops"][0]["version"] = 99
    with pytest.raises(UnsupportedFormat):
        Recipe.from_manifest(manifest)
    manifest = Recipe.parse("rrc+flip").to_manifest()
    manifest["ops"][1]["p"] = 0.9
    with pytest.raises(InvalidSpec, match="disagrees"):
        Recipe.from_manifest(manifest)


def test_partner_stream_never_collides_with_view_streams():
    recipe = Recipe.parse("rrc+mixup")
    params = recipe.sample(0, np.arange(N), np.zeros(N, dtype=np.int64), N)
    partner = params["mixup_partner"]
    own = recipe.sample(0, partner, np.zeros(N, dtype=np.int64), N)["rrc"]
    assert not (params["partner_rrc"] == own).all(axis=1).any()
    assert math.isfinite(float(params["mixup_lam"].sum()))


def _beta_cdf(x: np.ndarray, a: float) -> np.ndarray:
    """Regularised incomplete beta I_x(a, a), without scipy: the power series of
    B(x; a, b) = sum_n (1-b)_n / n! * x^(a+n) / (a+n) on x <= 1/2, and symmetry above."""
    x = np.asarray(x, dtype=np.float64)
    low = np.minimum(x, 1.0 - x)
    total, coef, power = np.zeros_like(low), 1.0, low**a
    for n in range(400):  # low <= 1/2, so term n is below 2**-n
        total += coef * power / (a + n)
        coef *= (n + 1 - a) / (n + 1)
        power = power * low
    cdf = total / math.exp(2 * math.lgamma(a) - math.lgamma(2 * a))
    return np.where(x <= 0.5, cdf, 1.0 - cdf)


def _ks_statistic(draws: np.ndarray, cdf: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between sorted draws' empirical CDF and ``cdf`` at those draws."""
    n = len(draws)
    ranks = np.arange(1, n + 1) / n
    return float(max((ranks - cdf).max(), (cdf - (ranks - 1 / n)).max()))


def test_reference_beta_cdf_matches_closed_forms():
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(_beta_cdf(x, 1.0), x, atol=1e-12)
    np.testing.assert_allclose(_beta_cdf(x, 2.0), 3 * x**2 - 2 * x**3, atol=1e-12)
    np.testing.assert_allclose(_beta_cdf(x, 0.5), 2 / np.pi * np.arcsin(np.sqrt(x)), atol=1e-12)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_beta_sampler_follows_the_exact_beta_cdf(alpha):
    """200k draws against the exact Beta(alpha, alpha) CDF. The seed is fixed, so this never flakes:
    the bound is the KS 0.999 quantile, and the same draws are far from Beta(1.15 alpha)."""
    n = 200_000
    idx = np.arange(n)
    lam = np.sort(Draws(7, idx // 8, idx % 8, 5).beta(alpha))
    bound = 1.95 / math.sqrt(n)
    assert _ks_statistic(lam, _beta_cdf(lam, alpha)) < bound
    assert _ks_statistic(lam, _beta_cdf(lam, 1.15 * alpha)) > 2 * bound
    assert abs(lam.mean() - 0.5) < 3e-3
    assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 2e-3


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_stored_mixup_lambdas_have_beta_moments_and_quantiles(alpha):
    # float32 storage rounds lambdas within 3e-8 of 1 to exactly 1 (1.6% of them at alpha 0.2),
    # so the stored values are checked by moments and quantiles rather than by a KS distance
    pairs = np.arange(50_000)
    lam = Recipe.parse(f"mixup:{alpha}").sample(3, pairs % 1000, pairs // 1000, 1000)["mixup_lam"]
    lam = lam.astype(np.float64)
    assert abs(lam.mean() - 0.5) < 6e-3
    assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 3e-3
    for q in (0.01, 0.1, 0.25, 0.5, 0.9):
        assert abs(np.mean(lam <= q) - _beta_cdf(np.array(q), alpha)) < 8e-3


@pytest.mark.parametrize("alpha", [0.005, 0.2, 0.9, 1.0, 1.5, 40.0])
def test_beta_draws_are_pure_finite_and_in_unit_interval(alpha):
    idx = np.arange(3000)
    views = idx % 7
    full = Draws(11, idx, views, 3).beta(alpha)
    assert full.dtype == np.float64 and np.isfinite(full).all() and ((full >= 0) & (full <= 1)).all()
    order = np.random.default_rng(0).permutation(3000)[:101]
    assert Draws(11, idx[order], views[order], 3).beta(alpha).tobytes() == full[order].tobytes()
    assert not np.array_equal(Draws(12, idx, views, 3).beta(alpha), full)


def test_beta_falls_back_to_one_half_when_every_try_is_rejected():
    near_one = np.full((4, 64), 1 - 2.0**-33)  # Johnk: X + Y ~ 2 > 1, always rejected
    assert (_johnk(near_one, 0.5) == 0.5).all()
    u = np.tile([0.5, 0.125, near_one[0, 0], near_one[0, 0]], (4, 16))  # Marsaglia-Tsang rejects log U ~ 0
    assert (_gamma_ratio(u, 2.0) == 0.5).all()


def test_mixing_needs_no_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # any `import scipy...` now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.special", None)
    for spec in ("mixup:0.2", "mixup:2", "cutmix:0.7:0.5"):
        lam = Recipe.parse(spec).mixing(_batch(Recipe.parse(spec)))[1]
        assert ((lam >= 0) & (lam <= 1)).all()


def test_pilrrc_crops_the_rrc_box_and_resizes_it_as_torchvisions_pil_path_does():
    from PIL import Image
    from torchvision.transforms import functional as F1

    recipe = Recipe.parse("pilrrc:0.3+flip")
    assert recipe.fields() == Recipe.parse("rrc:0.3+flip").fields()
    image = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (3, 37, 53), dtype=np.uint8))
    params = recipe.sample(5, np.arange(6), np.zeros(6, dtype=np.int64), 6)
    for j in range(6):
        row = {k: v[j] for k, v in params.items()}
        for mode in ("bilinear", "bicubic"):
            x0, y0, w, h = box_row(row, "rrc")
            left, width = pixel_span(x0, w, 53, 1)
            top, height = pixel_span(y0, h, 37, 1)
            pil = F1.resized_crop(Image.fromarray(image.permute(1, 2, 0).numpy()), top, left, height, width, [24, 24],
                                  interpolation=F1.InterpolationMode(mode))
            if row["flip"]:
                pil = F1.hflip(pil)
            expected = F1.pil_to_tensor(pil).float() / 255
            assert torch.equal((recipe.apply(image, row, 24, interpolation=mode) * 255).round(), (expected * 255).round())
    with pytest.raises(InvalidSpec, match="rrc and pilrrc both crop"):
        Recipe.parse("rrc+pilrrc")


def test_cutmix_replay_in_lattice_steps_equals_the_edges_it_stored():
    """Reading a sampled box in whole grid steps changes no pixel: every sampled edge lies on the grid."""
    recipe = Recipe.parse("rrc+cutmix")
    params = recipe.sample(3, np.arange(40), np.zeros(40, dtype=np.int64), 40)
    own, other = torch.zeros(3, 64, 64), torch.ones(3, 64, 64)
    for j in range(40):
        row = {k: v[j] for k, v in params.items()}
        x0, y0, w, h = box_row(row, "cutmix_box")
        for n in (32, 50, 64):
            def old_coverage(start, length):
                edges = np.arange(n, dtype=np.float64)
                return np.clip(np.minimum(edges + 1, (start + length) * n) - np.maximum(edges, start * n), 0.0, 1.0)
            mask = torch.from_numpy(np.outer(old_coverage(y0, h), old_coverage(x0, w)).astype(np.float32))
            got = recipe.ops[-1].mix(own[:, :n, :n], other[:, :n, :n], row)
            assert torch.equal(got, own[:, :n, :n] * (1 - mask) + other[:, :n, :n] * mask) or (w == 0 or h == 0)
