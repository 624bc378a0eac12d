"""TinyViT's default training augmentation (RandAugment rand-m9-mstd0.5-inc1, random erasing in pixel mode) and
its ImageNet-22k keys import: every (sample, epoch) replays the view TinyViT's code renders from the saved seed
(tests/interop_sources.py retells it), and its draws (kdcache/interop/tinyvit_draws.py) are TinyViT's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from interop_sources import (TINYVIT_MEAN, TINYVIT_STD, _AugRandom, make_folder, tinyvit_config, tinyvit_item,
                             tinyvit_randaugment, write_tinyvit, write_tinyvit_mixed)
from PIL import Image

from tests_support import pillow_before_13, run_cli
from kdcache import data
from kdcache.augment import Recipe
from kdcache.augment.op import from_pil
from kdcache.augment.timm_ops import TimmRandAugment, apply_timm_op
from kdcache.cache.store import open_cache
from kdcache.errors import InvalidSpec
from kdcache.interop.imported import folder_order
from kdcache.interop.imports import import_cache
from kdcache.interop.tinyvit_draws import RandAugmentConfig, Stream, randaugment


@pytest.fixture(scope="module", autouse=True)
def _sources_pillow():
    """The sources were rendered under Pillow 9.5-12.2's resize order, which imports replay by default."""
    with pillow_before_13():
        yield

DEFAULT = {"AUG.AUTO_AUGMENT": "rand-m9-mstd0.5-inc1", "AUG.REPROB": 0.25, "AUG.REMODE": "pixel",
           "AUG.COLOR_JITTER": 0.4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tinyvit-default") / "pets", per_class=6)


def spec(folder: Path) -> str:
    return f"imagefolder:{folder}"


@pytest.fixture(scope="module")
def imported(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    saved = write_tinyvit(folder, root / "logits", epochs=4, default_aug=True)
    config = tinyvit_config(root / "config.json", **DEFAULT)
    path = import_cache("tinyvit", str(root / "logits"), spec(folder), str(root / "caches"), config=str(config),
                        progress=False).path
    return root, saved, path


def replay(cache, source, i: int, v: int) -> torch.Tensor:
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    row = {k: x[0] for k, x in cache.aug_params(np.array([i]), np.array([v])).items()}
    return recipe.apply(source.train[i][0], row, 40, interpolation=cache.manifest["recipe"]["interpolation"])


def test_every_view_is_the_item_tinyvits_transform_renders(folder, imported):
    """Pixels outside the erased box are TinyViT's uint8 pixels; normalised, the view is TinyViT's item (its
    noise included) to float32 rounding."""
    _, saved, path = imported
    cache, source = open_cache(path), data.open_source(spec(folder))
    assert cache.manifest["recipe"]["augment"]["spec"] == "pilrrc:0.08:1:2+flip+timmra+noiseerase"
    order = folder_order(source)
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (TINYVIT_MEAN, TINYVIT_STD))
    erased = applied = 0
    for t in range(len(source.train)):
        i = int(order[t])
        for epoch in range(cache.views):
            seed, ids, _ = saved[(t, epoch)]
            pixels, item, boxes = tinyvit_item(folder, seed, t)
            ours = replay(cache, source, i, epoch)
            keep = torch.ones(40, 40, dtype=torch.bool)
            for top, left, h, w in boxes:
                keep[top:top + h, left:left + w] = False
            assert torch.equal((ours * 255).round()[:, keep], (pixels * 255).round()[:, keep]), (t, epoch)
            assert torch.allclose((ours - mean) / std, item, atol=2e-5), (t, epoch)
            assert np.array_equal(cache.read_views("topk/indices", np.array([i]), np.array([epoch]))[0], ids)
            erased += bool(boxes)
            applied += int((cache.aug_params(np.array([i]), np.array([epoch]))["timmra"][0][:, 0] >= 0).sum())
    assert erased > 0 and applied > 10


def test_the_draws_follow_tinyvits_stream():
    """The (op, argument) rows kdcache draws give, through its ops, the image TinyViT's RandAugment gives."""
    config = RandAugmentConfig.parse("rand-m9-mstd0.5-inc1")
    assert config == RandAugmentConfig(9.0, 2, 0.5, None, True)
    img = Image.fromarray(np.random.RandomState(1).randint(0, 256, (33, 41, 3), dtype=np.uint8))
    op = TimmRandAugment(2, 124, 116, 104, resample=3)
    for seed in range(200):
        rows = randaugment(Stream(seed), config)
        want = tinyvit_randaugment(img, _AugRandom(seed), (124, 116, 104), Image.BICUBIC)
        assert torch.equal(op.apply(from_pil(img), {"timmra": rows}, 33), from_pil(want)), seed


def test_posterize_to_no_bits_is_black_as_timm_meant():
    """TinyViT asks for 0 bits at magnitude 10; Pillow 13 refuses that, kdcache's table gives what Pillow up to 12.2
    gave (all zero)."""
    img = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    assert np.asarray(apply_timm_op(img, "posterize", 0, (0, 0, 0), 3)).max() == 0
    assert np.array_equal(np.asarray(apply_timm_op(img, "posterize", 2, (0, 0, 0), 3)), np.full((4, 4, 3), 192))


def test_imagenet_22k_keys_name_their_images(folder, imported, tmp_path, capsys):
    """Keys that are file names (data/imagenet22k_dataset.py) import as the index keys do."""
    root, saved, path = imported
    source = data.open_source(spec(folder))
    order = folder_order(source)
    names = [Path(source.train.files[int(order[t])]).stem for t in range(len(order))]
    write_tinyvit(folder, tmp_path / "logits", epochs=4, default_aug=True, keys=[f"{c}_{n}" for c, n in zip(
        [Path(source.train.files[int(order[t])]).parent.name for t in range(len(order))], names)])
    config = tinyvit_config(tmp_path / "config.json", **DEFAULT)
    with pytest.raises(InvalidSpec, match="two images of the dataset are named '00'"):
        import_cache("tinyvit", str(tmp_path / "logits"), spec(folder), str(tmp_path / "out"), config=str(config),
                     progress=False)
    renamed = _renamed_folder(folder, tmp_path / "named")
    got = import_cache("tinyvit", str(tmp_path / "logits"), spec(renamed), str(tmp_path / "out"), config=str(config),
                       progress=False).path
    ours, theirs = open_cache(got), open_cache(path)
    keys = tmp_path / "logits" / "logits_top2_epoch1" / "rank0-keys.txt"
    keys.write_text(keys.read_text().replace(keys.read_text().split()[0], "n9_missing", 1))
    with pytest.raises(InvalidSpec, match="key 'n9_missing' names no image of the dataset"):
        import_cache("tinyvit", str(tmp_path / "logits"), spec(renamed), str(tmp_path / "out2"), config=str(config),
                     progress=False)
    for name in ("aug/rrc", "aug/timmra", "aug/noiseerase", "topk/indices"):
        assert np.array_equal(ours.read_array(name), theirs.read_array(name)), name


def _renamed_folder(folder: Path, to: Path) -> Path:
    """``folder`` with every image named ``<class>_<name>`` (ImageNet-22k's names), in the same order."""
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder)
        target = to / rel.parent / f"{rel.parent.name}_{rel.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return to


MIXING = {**DEFAULT, "AUG.MIXUP": 0.8, "AUG.CUTMIX": 1.0, "DATA.BATCH_SIZE": 4}


def test_pair2_mixed_views_are_the_rows_tinyvit_mixed(folder, tmp_path):
    """With MixUp 0.8 / CutMix 1.0 (TinyViT's defaults), each view is its sample's sampler row mixed as TinyViT
    mixed it (its mate rendered from the mate's saved seed, the pair drawn from their XOR), and its logits are
    that row's; the import checks the keys files against the sampler this torch gives."""
    found = write_tinyvit_mixed(folder, tmp_path / "logits", epochs=2)
    config = tinyvit_config(tmp_path / "config.json", **MIXING)
    path = import_cache("tinyvit", str(tmp_path / "logits"), spec(folder), str(tmp_path / "out"), config=str(config),
                        progress=False).path
    cache, source = open_cache(path), data.open_source(spec(folder))
    assert cache.manifest["recipe"]["augment"]["spec"] == "pilrrc:0.08:1:2+flip+timmra+noiseerase+pairmix"
    assert {"cutmix", "mixup"} <= _rows_as_tinyvit_mixed(cache, source, found, folder_order(source), epochs=2)


def _rows_as_tinyvit_mixed(cache, source, found: dict, index: np.ndarray, epochs: int) -> set[str]:
    """Asserts that each view of TinyViT position t (kdcache sample ``index[t]``) is one of the rows ``found`` holds
    for it, mixed as TinyViT mixed it, with that row's logits; returns the kinds of mixing met."""
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (TINYVIT_MEAN, TINYVIT_STD))
    kinds = set()
    for t in range(len(source.train)):
        i = int(index[t])
        for epoch in range(epochs):
            row = {k: x[0] for k, x in cache.aug_params(np.array([i]), np.array([epoch])).items()}
            ours = recipe.apply(source.train[i][0], row, 40, partner=lambda j: source.train[j][0],
                                interpolation="bicubic")
            ids = cache.read_views("topk/indices", np.array([i]), np.array([epoch]))[0]
            match = [f for f in found[(t, epoch)] if torch.allclose((ours - mean) / std, f[0], atol=3e-5)]
            assert match and np.array_equal(ids, match[0][3]), (t, epoch)
            kinds.add("cutmix" if row["pairmix_box"].any() else "mixup" if row["pairmix_partner"] >= 0 else "none")
    return kinds


def test_imagenet_22k_names_with_pair2_mixing_follow_tinyvits_own_list(folder, tmp_path):
    """With mixing, the sampler's rows are positions in TinyViT's own list (in22k_image_names.txt), an order the
    image folder does not keep: the import rebuilds it from the first epoch's keys files (each rank's keys name the
    first appearances in its rows), checks every later epoch against the sampler, and each view is its row mixed
    as TinyViT mixed it."""
    source = data.open_source(spec(folder))
    order = folder_order(source)
    name = [f"{Path(source.train.files[int(order[u])]).parent.name}_{Path(source.train.files[int(order[u])]).stem}"
            for u in range(len(order))]  # ImageFolder image u as _renamed_folder names it
    listed = [int(u) for u in np.random.default_rng(3).permutation(len(order))]  # position -> ImageFolder image
    found = write_tinyvit_mixed(folder, tmp_path / "logits", epochs=3, keys=[name[u] for u in listed], images=listed)
    config = tinyvit_config(tmp_path / "config.json", **MIXING)
    renamed = data.open_source(spec(_renamed_folder(folder, tmp_path / "named")))
    path = import_cache("tinyvit", str(tmp_path / "logits"), renamed.spec, str(tmp_path / "out"), config=str(config),
                        progress=False).path
    index = folder_order(renamed)[listed]
    assert {"cutmix", "mixup"} <= _rows_as_tinyvit_mixed(open_cache(path), renamed, found, index, epochs=3)
    keys = tmp_path / "logits" / "logits_top2_epoch0" / "rank0-keys.txt"
    first, second, *rest = keys.read_text().split()
    keys.write_text("\n".join([second, first, *rest]) + "\n")  # another list order than the sampler's
    with pytest.raises(InvalidSpec, match="is named both .* and another image|keys are not the order TinyViT's sampler"):
        import_cache("tinyvit", str(tmp_path / "logits"), renamed.spec, str(tmp_path / "out2"), config=str(config),
                     progress=False)


def test_a_view_whose_mate_seed_was_not_saved_takes_another_epochs(tmp_path, capsys):
    """One rank, an odd number of samples: the last sample's row holds a padded copy of the first, whose saved seed
    is its first row's, so TinyViT's own trainer reads logits of a mix nobody can render there. The import gives
    that sample its view of the nearest epoch that replays, says so, and lists it; with one epoch it refuses."""
    folder = make_folder(tmp_path / "pets", per_class=5)
    write_tinyvit_mixed(folder, tmp_path / "logits", epochs=2, ranks=1)
    config = tinyvit_config(tmp_path / "config.json", **MIXING)
    code, out, err = run_cli(["import", "tinyvit", str(tmp_path / "logits"), "--dataset", spec(folder), "--out",
                              str(tmp_path / "out"), "--source-config", str(config), "--quiet"], capsys)
    assert code == 0 and "2 view(s) cannot be replayed" in err, err
    cache = open_cache(out.split(" written to ")[1].split(":")[0])
    moved = cache.manifest["imported"]["substituted"]
    order = folder_order(data.open_source(spec(folder)))
    assert sorted(e for e, _, _ in moved) == [0, 1] and all(e2 != e for e, _, e2 in moved)
    for e, t, e2 in moved:
        i = np.array([int(order[t])])
        for name in ("aug/rrc", "aug/pairmix_partner", "topk/indices"):
            assert np.array_equal(cache.read_views(name, i, np.array([e])), cache.read_views(name, i, np.array([e2])))
    import shutil

    shutil.rmtree(tmp_path / "logits" / "logits_top2_epoch1")
    with pytest.raises(InvalidSpec, match=r"sample \d+ was mixed with a padded copy whose saved seed belongs to an "
                                          "earlier row of the same rank in every epoch"):
        import_cache("tinyvit", str(tmp_path / "logits"), spec(folder), str(tmp_path / "out2"), config=str(config),
                     progress=False)


def test_keys_that_are_not_this_samplers_order_are_refused(folder, tmp_path):
    write_tinyvit_mixed(folder, tmp_path / "logits", epochs=1)
    keys = tmp_path / "logits" / "logits_top2_epoch0" / "rank0-keys.txt"
    lines = keys.read_text().splitlines()
    keys.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    config = tinyvit_config(tmp_path / "config.json", **MIXING)
    with pytest.raises(InvalidSpec, match="is named both .* and another image|keys are not the order TinyViT's sampler"):
        import_cache("tinyvit", str(tmp_path / "logits"), spec(folder), str(tmp_path / "out"), config=str(config),
                     progress=False)


def test_its_pixel_boxes_refuse_another_view_size_in_one_line(folder, imported, tmp_path, capsys):
    """Erasing noise and pair boxes are pixels of the teacher's 40 px views: a student at another size is refused
    before training, not fed boxes at the wrong scale."""
    _, _, path = imported
    code, _, err = run_cli(["train", "--dataset", spec(folder), "--model", "cnn", "--cache", path, "--size", "80",
                            "--epochs", "1", "--out", str(tmp_path / "s"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "recorded in pixels of 40 px views, not 80 px" in err, err


@pytest.mark.parametrize("text, says", [("", "is empty"), ("- 1\n- 2\n", "not a mapping"),
                                        ("AUG:\n  MIXUP: 0.8\n  MIXUP_PROB: x\nDATA:\n  BATCH_SIZE: 4\n",
                                         "AUG.MIXUP_PROB 'x' is not a probability")])
def test_a_config_that_is_empty_or_not_numbers_is_refused(folder, imported, tmp_path, text, says):
    root, _, _ = imported
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(InvalidSpec, match=says):
        import_cache("tinyvit", str(root / "logits"), spec(folder), str(tmp_path / "out"),
                     config=str(tmp_path / "config.json"), progress=False)


def test_an_honest_import_is_intact_to_verify_its_zero_probabilities_too(imported):
    """A top-k probability of 0 is stored as log 0 = -inf; verify counted it as damage before (red-team of
    2026-12-07), so its exit code could not tell an honest TinyViT import from a forged one."""
    from kdcache.cache.integrity import verify

    _, _, path = imported
    assert np.isneginf(open_cache(path).read_array("topk/values")).any()
    report = verify(path, params=True)
    assert report.ok, report.problems
