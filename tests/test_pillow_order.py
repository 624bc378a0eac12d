"""A Pillow resize in two passes, horizontal then vertical (kdcache.augment.op.pil_resize, passes 2), gives the
pixels Pillow 9.5-12.2 give in one call, under any Pillow; imports use it unless --pillow-order installed.

tests/fixtures/pillow/resize_pillow_10.4.npz holds crops of a seeded image resized by a real Pillow 10.4.0
(``Image.crop(box).resize((s, s), resample)``, written by a script run outside the project, with Pillow 10.4.0
on the path); Pillow 13 takes the vertical pass first for the first two shapes, and its one call differs there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mldr_sources import mldr_pixels, write_mldr
from PIL import Image
from source_folder import make_folder
from tests_support import run_cli

from kdcache import data
from kdcache.augment import Recipe
from kdcache.augment.op import pil_resize
from kdcache.cache.store import open_cache
from kdcache.interop.imported import folder_order

FIXTURES = Path(__file__).parent / "fixtures" / "pillow"


def _cases() -> tuple[Image.Image, list, dict]:
    meta = json.loads((FIXTURES / "resize_pillow_10.4.json").read_text())
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (130, 140, 3), dtype=np.uint8))
    return image, meta["cases"], dict(np.load(FIXTURES / "resize_pillow_10.4.npz"))


def test_two_passes_give_pillow_10s_pixels_under_this_pillow():
    image, cases, want = _cases()
    for k, (box, size, resample) in enumerate(cases):
        got = np.asarray(pil_resize(image.crop(tuple(box)), (size, size), resample, passes=2))
        assert np.array_equal(got, want[f"case{k}"]), (k, box)


def test_one_pass_is_this_pillows_own_resize():
    image, cases, _ = _cases()
    for box, size, resample in cases:
        crop = image.crop(tuple(box))
        assert np.array_equal(np.asarray(pil_resize(crop, (size, size), resample, passes=1)),
                              np.asarray(crop.resize((size, size), resample)))


def test_pilrrc_records_its_passes_and_old_manifests_keep_one():
    assert Recipe.parse("pilrrc:0.25:1:2+flip").ops[0].passes == 2
    assert Recipe.parse("pilrrc").spec == "pilrrc" and Recipe.parse("pilrrc").ops[0].passes == 1
    old = Recipe.parse("pilrrc:0.25+flip").to_manifest()
    del old["ops"][0]["passes"]  # as written before passes existed
    assert Recipe.from_manifest(old).ops[0].passes == 1


def test_an_import_with_the_installed_order_replays_this_pillows_reader(tmp_path, capsys):
    """--pillow-order installed: for a source written with the Pillow installed here (its reader retold without
    the older order)."""
    folder = make_folder(tmp_path / "pets")
    write_mldr(folder, tmp_path / "src", views=2, interpolation=3)
    code, out, err = run_cli(["import", "ml-dr", str(tmp_path / "src"), "--dataset", f"imagefolder:{folder}", "--out",
                              str(tmp_path / "out"), "--pillow-order", "installed", "--quiet"], capsys)
    assert code == 0, err
    cache, source = open_cache(out.split(" written to ")[1].split(":")[0]), data.open_source(f"imagefolder:{folder}")
    assert cache.manifest["recipe"]["augment"]["spec"].startswith("pilrrc:0.25+") and \
        cache.manifest["imported"]["pillow_order"] == "installed"
    recipe, order = Recipe.from_manifest(cache.manifest["recipe"]["augment"]), folder_order(source)
    for t in range(len(source.train)):
        i = int(order[t])
        for v in range(2):
            row = {k: x[0] for k, x in cache.aug_params(np.array([i]), np.array([v])).items()}
            ours = recipe.apply(source.train[i][0], row, cache.manifest["recipe"]["input_size"], interpolation="bicubic")
            theirs = mldr_pixels(folder, tmp_path / "src", t, v)[0]
            assert np.array_equal((ours * 255).round().numpy(), (theirs * 255).round().numpy()), (t, v)
    code, _, err = run_cli(["import", "ml-dr", str(tmp_path / "src"), "--dataset", f"imagefolder:{folder}", "--out",
                            str(tmp_path / "out2"), "--pillow-order", "newest"], capsys)
    assert code == 2 and "--pillow-order 'newest' is not one of legacy, installed" in err


@pytest.mark.parametrize("spec", ["pilrrc:0.2:1:3", "resize:8:8:0"])
def test_passes_other_than_one_or_two_are_refused(spec):
    from kdcache.errors import InvalidSpec

    with pytest.raises(InvalidSpec, match="passes must be 1 or 2"):
        Recipe.parse(spec)


def test_a_one_pass_cache_replayed_under_another_pillow_is_warned_about(tmp_path, monkeypatch, capsys):
    """A cache whose crops resize in one pass (the recording Pillow's order) says so when the Pillow that replays
    it is another (its provenance records the one that recorded it); two passes replay the same anywhere."""
    import PIL
    import warnings

    from tests_support import save_cnn_teacher

    from kdcache.teacher.config import PrecomputeConfig
    from kdcache.teacher.precompute import precompute

    weights = save_cnn_teacher(tmp_path, "t.pt", seed=1, scale=5)
    paths = {spec: precompute(PrecomputeConfig(dataset="fake:16", teacher="cnn", weights=weights, views=1,
                                               augment=spec, out=str(tmp_path / "c"), progress=False)).path
             for spec in ("pilrrc+flip", "pilrrc:0.08:1:2+flip")}
    assert open_cache(paths["pilrrc+flip"]).manifest["provenance"]["pillow"] == PIL.__version__
    monkeypatch.setattr(PIL, "__version__", "99.0.0")
    for spec, path in paths.items():
        argv = ["train", "--dataset", "fake:16", "--model", "cnn", "--cache", path, "--epochs", "1", "--out",
                str(tmp_path / spec.replace(":", "_")), "--quiet"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = run_cli(argv, capsys)
        said = [str(w.message) for w in caught if "recorded under Pillow" in str(w.message)]
        assert code == 0, err
        assert bool(said) == (spec == "pilrrc+flip"), (spec, said)
