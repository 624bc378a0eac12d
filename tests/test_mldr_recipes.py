"""ml-dr's published kinds of reinforcement import and replay what its code renders: CIFAR-style resize and padded
random crop, RandAugment (as ml-dr's reader renders it, or as its writer did for the teacher), MixUp followed by
CutMix with one partner, and whole images where no transform crops (tests/mldr_sources.py retells ml-dr)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mldr_sources import MLDR_MEAN, MLDR_STD, mldr_pixels, mldr_writer_pixels, write_mldr
from PIL import Image
from source_folder import CLASSES, SIZE, make_folder
from tests_support import pillow_before_13, run_cli

from kdcache import data
from kdcache.augment import Recipe
from kdcache.cache.store import open_cache
from kdcache.errors import DataCorrupt, InvalidSpec
from kdcache.interop.imported import folder_order
from kdcache.interop.imports import import_cache


@pytest.fixture(scope="module", autouse=True)
def _sources_pillow():
    """The sources were rendered under Pillow 9.5-12.2's resize order, which imports replay by default."""
    with pillow_before_13():
        yield

BASE = {"uint8": {"enable": True}, "to_tensor": {"enable": True},
        "normalize": {"enable": True, "mean": list(MLDR_MEAN), "std": list(MLDR_STD)}}
FLIP = {"random_horizontal_flip": {"enable": True, "p": 0.5}}
RA = {"rand_augment": {"enable": True, "p": 0.9}}
ERASE = {"random_erase": {"enable": True, "p": 0.5}}
RRC = {"random_resized_crop": {"enable": True, "size": SIZE, "scale": [0.25, 1.0]}}
MIXING = {"mixup": {"enable": True, "alpha": 1.0, "div_by": 2.0, "p": 0.5}, "cutmix": {"enable": True, "alpha": 1.0, "p": 0.5}}
#: configs/<dataset>/reinforce*.yaml in miniature: the same transforms at a 16 px view.
CONFIGS = {
    "cifar": {"resize": {"size": [SIZE, SIZE]}, "random_crop": {"size": SIZE, "padding": 4}, **FLIP, **RA, **ERASE},
    "cifar_shorter_side": {"resize": {"size": SIZE}, "random_crop": {"size": SIZE, "padding": 2}, **FLIP, **RA},
    "randaug": {**RRC, **FLIP, **RA, **ERASE},
    "mixing": {**RRC, **FLIP, **MIXING},
    "randaug_mixing": {**RRC, **FLIP, **RA, **ERASE, **MIXING},
}


def spec(folder: Path) -> str:
    return f"imagefolder:{folder}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("mldr-recipes") / "pets")


@pytest.fixture(scope="module")
def square_folder(tmp_path_factory) -> Path:
    """Every image SIZE x SIZE: a dataset on which views without a crop share one size."""
    root = tmp_path_factory.mktemp("square") / "pets"
    rng = np.random.RandomState(3)
    for split, count in (("train", 4), ("val", 1)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def sources(folder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mldr-sources")
    out = {}
    for n, (name, steps) in enumerate(CONFIGS.items()):
        out[name] = root / name
        write_mldr(folder, out[name], views=3, seed=n, compressed=n % 2 == 0, aug={**BASE, **steps})
    return out


def replay(cache, source, i: int, v: int) -> torch.Tensor:
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    row = {k: x[0] for k, x in cache.aug_params(np.array([i]), np.array([v])).items()}
    return recipe.apply(source.train[i][0], row, cache.manifest["recipe"]["input_size"],
                        partner=lambda j: source.train[j][0], interpolation=cache.manifest["recipe"]["interpolation"])


def check_views(folder: Path, src: Path, path: str, render) -> int:
    """Every view of the import against ``render`` (ml-dr's); the number of mixed views."""
    cache, source = open_cache(path), data.open_source(spec(folder))
    order = folder_order(source)
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    mixed = 0
    for t in range(len(source.train)):
        i = int(order[t])
        partner, lam = recipe.mixing(cache.aug_params(np.array([i] * cache.views), np.arange(cache.views)))
        for v in range(cache.views):
            ours, theirs = replay(cache, source, i, v), render(folder, src, t, v)
            if partner[v] < 0:
                assert torch.equal((ours * 255).round(), (theirs * 255).round()), (t, v)
            mixed += int(partner[v] >= 0)
            assert (ours - theirs).abs().max() <= 1e-6, (t, v)
    return mixed


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_kind_replays_the_pixels_ml_drs_reader_gives(folder, sources, tmp_path, name):
    path = import_cache("ml-dr", str(sources[name]), spec(folder), str(tmp_path / "out"), progress=False).path
    mixed = check_views(folder, sources[name], path, lambda f, s, t, v: mldr_pixels(f, s, t, v)[0])
    assert (mixed > 0) == ("mixup" in CONFIGS[name])
    spec_ = open_cache(path).manifest["recipe"]["augment"]["spec"]
    assert ("pilra" in spec_) == ("rand_augment" in CONFIGS[name])


def test_mixup_then_cutmix_keeps_the_product_of_both_lambdas(folder, sources, tmp_path):
    """A view that both mixed holds MixUp's blend outside CutMix's box and the partner inside: its own share is
    λ_mixup·(1 − box area), as ml-dr's Compose applies the two in turn."""
    path = import_cache("ml-dr", str(sources["mixing"]), spec(folder), str(tmp_path / "out"), progress=False).path
    cache = open_cache(path)
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    n = cache.num_samples
    params = cache.aug_params(np.repeat(np.arange(n), cache.views), np.tile(np.arange(cache.views), n))
    both = (params["mixup_partner"] >= 0) & (params["cutmix_partner"] >= 0)
    assert both.any() and (params["mixup_partner"][both] == params["cutmix_partner"][both]).all()
    _, lam = recipe.mixing(params)
    assert np.allclose(lam[both], params["mixup_lam"][both] * params["cutmix_lam"][both])


@pytest.mark.parametrize("name", ["randaug", "cifar"])
def test_tensor_rendering_replays_what_ml_drs_writer_showed_the_teacher(folder, sources, tmp_path, name, capsys):
    code, _, err = run_cli(["import", "ml-dr", str(sources[name]), "--dataset", spec(folder), "--out",
                            str(tmp_path / "out"), "--randaugment-on", "tensor", "--quiet"], capsys)
    assert code == 0 and "replays the writer's" in err, err
    path = next(p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.is_symlink())
    assert "tvra" in open_cache(path).manifest["recipe"]["augment"]["spec"]
    check_views(folder, sources[name], str(path), mldr_writer_pixels)


def test_the_two_renderings_differ_and_each_matches_its_side(folder, sources, tmp_path):
    """What makes the option matter: ml-dr's reader (PIL) and writer (tensor) render some RandAugment views
    differently."""
    differ = 0
    for t in range(6):
        for v in range(3):
            reader = mldr_pixels(folder, sources["randaug"], t, v)[0]
            writer = mldr_writer_pixels(folder, sources["randaug"], t, v)
            differ += int(not torch.equal((reader * 255).round(), (writer * 255).round()))
    assert differ > 0


def test_views_without_a_crop_import_where_every_image_has_one_square_size(square_folder, folder, tmp_path, capsys):
    """Flowers-102 and Food-101's configs name ``random_resize_crop``, which ml-dr ignores: their views are whole
    images. On a dataset of one square size those are kdcache views; on images of many sizes, refused."""
    aug = {**BASE, "random_resize_crop": {"enable": True, "size": SIZE}, **FLIP, **RA}
    write_mldr(square_folder, tmp_path / "src", views=2, aug=aug)
    code, out, err = run_cli(["import", "ml-dr", str(tmp_path / "src"), "--dataset", spec(square_folder), "--out",
                              str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0 and "ml-dr ignores 'random_resize_crop'" in err, err
    path = out.split(" written to ")[1].split(":")[0]
    check_views(square_folder, tmp_path / "src", path, lambda f, s, t, v: mldr_pixels(f, s, t, v)[0])
    write_mldr(folder, tmp_path / "mixed-sizes", views=1, aug={**BASE, **FLIP})
    code, _, err = run_cli(["import", "ml-dr", str(tmp_path / "mixed-sizes"), "--dataset", spec(folder), "--out",
                            str(tmp_path / "out2")], capsys)
    assert code == 2 and err.count("\n") == 1 and "kdcache views share one square size" in err, err


def _edit_file(src: Path, to: Path, index: int, view: int, change) -> Path:
    shutil.copytree(src, to)
    t, entries = torch.load(to / f"{index}.pth.tar", weights_only=False)
    change(entries[view]["params"])
    torch.save((t, entries), to / f"{index}.pth.tar", pickle_protocol=4)
    return to


@pytest.mark.parametrize("step, message", [
    ((99, 1.0), "step \\(99, 1.0\\) is not an op of Identity, ShearX"),
    ((6, float("nan")), "magnitude nan is not a finite number"),
    ((10, 3.5), "posterize to 3.5 bits"),
    ((6, -2.0), "brightness factor 1 \\+ -2.0 is negative"),
    (("Mirror", 1.0), "step \\('Mirror', 1.0\\) is not an op of Identity"),
])
def test_randaugment_steps_that_cannot_be_replayed_are_damage(folder, sources, tmp_path, step, message):
    def change(params):
        params[2] = [step, step]  # randaug, compressed: [rrc, flip, rand_augment, erase]
    src = _edit_file(sources["randaug"], tmp_path / "src", 2, 1, change)
    with pytest.raises(DataCorrupt, match=r"2\.pth\.tar view 1: rand_augment " + message):
        import_cache("ml-dr", str(src), spec(folder), str(tmp_path / "out"), progress=False)


def test_a_random_crop_outside_its_padded_image_is_damage(folder, sources, tmp_path):
    def change(params):
        params[1] = (SIZE + 9, 0)  # cifar, compressed: [resize, random_crop, ...]; padding 4 allows 0..8
    src = _edit_file(sources["cifar"], tmp_path / "src", 0, 0, change)
    with pytest.raises(DataCorrupt, match=r"random_crop offset .* lies outside the 24x24 padded image"):
        import_cache("ml-dr", str(src), spec(folder), str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("extra, message", [
    ({"center_crop": {"size": SIZE}}, "ml-dr's CenterCrop fails on the PIL images"),
    ({"rand_augment": {"p": 1.0, "fill": [128, 128, 128]}}, "rand_augment with an interpolation or fill of its own"),
    ({"random_crop": {"size": SIZE, "padding": [1, 2]}}, "random_crop padding \\[1, 2\\]"),
    ({"resize": {"size": SIZE, "max_size": 40}}, "resize with max_size 40"),
])
def test_settings_ml_dr_cannot_run_or_kdcache_cannot_replay_are_refused(folder, sources, tmp_path, extra, message):
    shutil.copytree(sources["randaug"], tmp_path / "src")
    config = torch.load(tmp_path / "src" / "config.pth.tar", weights_only=False)
    config["reinforce"]["image_augmentation"].update(extra)
    torch.save(config, tmp_path / "src" / "config.pth.tar")
    with pytest.raises(InvalidSpec, match=message):
        import_cache("ml-dr", str(tmp_path / "src"), spec(folder), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_replay_only_ops_are_refused_for_precompute_in_one_line(capsys, tmp_path):
    code, _, err = run_cli(["precompute", "--dataset", "fake:8:3:8", "--teacher", "cnn", "--augment", "rrc+pilra",
                            "--out", str(tmp_path / "c"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "pilra" in err and "only replay params imported" in err, err
    assert not (tmp_path / "c").exists()


def test_mixup_then_cutmix_exports_to_ml_dr_and_imports_back(folder, sources, tmp_path):
    from kdcache.interop.mldr_export import export

    first = open_cache(import_cache("ml-dr", str(sources["mixing"]), spec(folder), str(tmp_path / "a"),
                                    progress=False).path)
    export(first.path, str(tmp_path / "exported"), progress=False)
    again = open_cache(import_cache("ml-dr", str(tmp_path / "exported"), spec(folder), str(tmp_path / "b"),
                                    progress=False).path)
    for name in first.array_names:
        if name.startswith("aug/"):
            assert np.array_equal(first.read_array(name), again.read_array(name)), name
    for t in range(6):  # and ml-dr's reader renders the export as kdcache replays it
        check = mldr_pixels(folder, tmp_path / "exported", t, 0)[0]
        i = int(folder_order(data.open_source(spec(folder)))[t])
        assert (replay(first, data.open_source(spec(folder)), i, 0) - check).abs().max() <= 1e-6


def test_a_cache_with_randaugment_is_not_exported_in_one_line(folder, sources, tmp_path):
    from kdcache.interop.mldr_export import export

    path = import_cache("ml-dr", str(sources["randaug"]), spec(folder), str(tmp_path / "a"), progress=False).path
    with pytest.raises(InvalidSpec, match="recipe op 'pilra' has no ml-dr transform that replays it"):
        export(path, str(tmp_path / "exported"), progress=False)
