"""The Renderer's reduced decode: a JPEG decoded at the smallest M/8 of its size at which the view's crop
keeps the output's side, recorded in the cache, replayed by the student and by verify."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests_support import run_cli
from zoo_support import jpeg_folder

from kdcache import open_cache
from kdcache.augment import Recipe
from kdcache.data import open_source
from kdcache.models.preprocess import Preprocess
from kdcache.views import Renderer, reduction


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageNet-shaped JPEGs of 400-500 px and their PNG twins (which no decode can reduce)."""
    root = tmp_path_factory.mktemp("views")
    jpegs = jpeg_folder(root / "jpeg", classes=2, train=3, val=1, sides=(400, 500))
    return jpegs


def test_the_reduction_keeps_the_crop_at_least_the_output_side():
    assert reduction(480, 400, (0.0, 0.0, 1.0, 1.0), 48) == (48, 48)
    assert reduction(480, 400, (0.1, 0.1, 0.5, 0.25), 64) == (128, 256)  # the crop is half and a quarter
    assert reduction(480, 400, (0.1, 0.1, 0.1, 0.1), 64) == (480, 400)  # a small crop needs every pixel


def test_a_reduced_decode_keeps_the_asked_size_at_an_m_8_scale(folder):
    import simplejpeg

    from kdcache.data.decode import decode_bytes

    data = next(folder.glob("train/*/*.jpg")).read_bytes()
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    image = decode_bytes(data, "RGB", lambda w, h: (w // 3, h // 3))
    assert image.shape[0] == 3 and image.shape[2] >= width // 3 and image.shape[1] >= height // 3
    assert image.shape[2] < width and image.shape[2] in {-(-width * m // 8) for m in range(1, 8)}
    assert decode_bytes(data, "L", lambda w, h: (w // 3, h // 3)).shape[0] == 1


def test_only_a_crop_of_the_whole_image_may_be_reduced():
    params = {"rrc": np.array([0, 0, 65535, 65535], dtype=np.uint16), "flip": np.array(1, dtype=np.uint8)}
    assert Recipe.parse("rrc+flip").source_box(params) == (0.0, 0.0, 1.0, 1.0)
    assert Recipe.parse("flip").source_box(params) == (0.0, 0.0, 1.0, 1.0)
    assert Recipe.parse("flip+rrc").source_box(params) is None


def renderers(spec: str, size: int) -> tuple[Renderer, Renderer, Recipe]:
    source = open_source(spec)
    recipe = Recipe.parse("rrc:0.35+flip")
    pre = Preprocess(source.mean, source.std, size)
    return (Renderer.for_model(source.train, recipe, pre), Renderer.for_model(source.train, recipe, pre, "reduced"),
            recipe)


def test_reduced_views_are_close_to_full_ones_deterministic_and_recorded_apart(folder):
    full, reduced, recipe = renderers(f"imagefolder:{folder}", 48)
    params = recipe.sample(3, np.arange(6), np.zeros(6, dtype=np.int64), 6)
    a, b = full.batch(range(6), params), reduced.batch(range(6), params)
    assert torch.equal(b, reduced.batch(range(6), params))
    assert not torch.equal(a, b)  # other pixels: hence a recipe option in the cache id
    assert (a - b).abs().mean() < 0.08  # normalised units: the same views, a little softer or sharper
    for j in range(6):
        assert torch.equal(b[j], reduced(j, {k: v[j] for k, v in params.items()}))


def test_a_png_is_never_reduced(tmp_path, folder):
    from PIL import Image

    for path in folder.glob("*/*/*.jpg"):
        target = tmp_path / "png" / path.relative_to(folder).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).save(target)
    full, reduced, recipe = renderers(f"imagefolder:{tmp_path / 'png'}", 48)
    params = recipe.sample(3, np.arange(4), np.zeros(4, dtype=np.int64), 4)
    assert torch.equal(full.batch(range(4), params), reduced.batch(range(4), params))


def test_a_reduced_cache_records_it_verifies_and_the_student_replays_it(folder, tmp_path, capsys):
    from kdcache import loader, models

    torch.manual_seed(0)
    torch.save(models.create_model("cnn", 2, 3).state_dict(), tmp_path / "t.pt")
    ids = {}
    for decode in ("full", "reduced"):
        code, out, err = run_cli(["precompute", "--dataset", f"imagefolder:{folder}", "--teacher", "cnn", "--weights",
                                  str(tmp_path / "t.pt"), "--views", "2", "--teacher-size", "48", "--decode", decode,
                                  "--augment", "rrc:0.35+flip", "--out", str(tmp_path / "c"), "--device", "cpu",
                                  "--quiet"], capsys)
        assert code == 0, err
        ids[decode] = out.split(" written to ")[1].split(":")[0]
    cache = open_cache(ids["reduced"])
    assert cache.manifest["recipe"]["decode"] == "reduced"
    assert "decode" not in open_cache(ids["full"]).manifest["recipe"]
    assert cache.id != open_cache(ids["full"]).id
    code, out, _ = run_cli(["verify", ids["reduced"], "--recompute", "6", "--device", "cpu"], capsys)
    assert code == 0 and "6 views replayed" in out
    batch = next(iter(loader(ids["reduced"], f"imagefolder:{folder}", batch_size=6)))
    _, reduced, _ = renderers(f"imagefolder:{folder}", 48)
    reduced.recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    params = cache.aug_params(batch["index"].numpy(), batch["view"].numpy())
    expected = reduced.batch(batch["index"].tolist(), params)
    assert torch.equal(batch["input"], expected)
    code, _, err = run_cli(["precompute", "--dataset", f"imagefolder:{folder}", "--teacher", "cnn", "--weights",
                            str(tmp_path / "t.pt"), "--decode", "half", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--decode 'half' is not one of full, reduced" in err
