"""A timm: recipe (kdcache/augment/timm_recipe.py) replays timm's own training transform under a recorded seed:
the same pixels as timm gives under that seed, from any kdcache render thread or loader worker, leaving the global
random streams as they were; other package versions are refused in one line, or warned about where allowed."""

from __future__ import annotations

import random
import re
import threading

import numpy as np
import pytest
import torch
from tests_support import run_cli, save_cnn_teacher

from kdcache.augment import Recipe
from kdcache.augment import timm_recipe
from kdcache.augment.op import to_pil
from kdcache.cache.store import open_cache
from kdcache.errors import InvalidSpec, UnsupportedFormat
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

timm_data = pytest.importorskip("timm.data")
SPEC = "timm:rand-m9-mstd0.5-inc1,re=0.25,remode=pixel,jitter=0.4,interp=bicubic"


def _image(seed: int, h: int = 40, w: int = 52) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_a_view_is_timms_transform_under_the_views_seed():
    """timm's create_transform with the same arguments, after seeding random, NumPy and torch with the stored
    seed: its normalised output, un-normalised, is the replay bit for bit."""
    recipe = Recipe.parse(SPEC)
    params = recipe.sample(3, np.arange(6), np.zeros(6, np.int64), 6)
    transform = timm_data.create_transform(input_size=24, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                           re_prob=0.25, re_mode="pixel", color_jitter=0.4, interpolation="bicubic")
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    for j in range(6):
        seed = int(params["timm"][j])
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        want = transform(to_pil(_image(j))) * std + mean
        assert torch.equal(recipe.apply(_image(j), {"timm": params["timm"][j]}, 24), want), j


def test_replay_leaves_every_global_stream_where_it_was():
    recipe = Recipe.parse(SPEC)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.random(), np.random.random(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    recipe.apply(_image(0), {"timm": np.int64(12345)}, 24)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == before


def test_threads_replaying_at_once_get_the_views_they_would_get_alone():
    recipe = Recipe.parse(SPEC + "+mixup:0.8")
    n = 16
    params = recipe.sample(0, np.arange(n), np.zeros(n, np.int64), n)
    images = [_image(j) for j in range(n)]
    alone = [recipe.apply(images[j], {k: v[j] for k, v in params.items()}, 24, partner=images.__getitem__)
             for j in range(n)]
    together: dict[int, torch.Tensor] = {}

    def work(js: range) -> None:
        for j in js:
            together[j] = recipe.apply(images[j], {k: v[j] for k, v in params.items()}, 24, partner=images.__getitem__)

    threads = [threading.Thread(target=work, args=(range(t, n, 4),)) for t in range(4)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert all(torch.equal(alone[j], together[j]) for j in range(n))


def test_the_spec_is_canonical_and_the_manifest_records_the_versions():
    recipe = Recipe.parse("timm:rand-m9-mstd0.5-inc1,jitter=0.4,re=0.25")  # jitter 0.4 is timm's default
    assert recipe.spec == "timm:rand-m9-mstd0.5-inc1,re=0.25"
    entry = recipe.to_manifest()["ops"][0]
    assert entry["versions"] == timm_recipe.installed_versions() and set(entry["versions"]) == set(timm_recipe.PACKAGES)
    assert Recipe.from_manifest(recipe.to_manifest()) == recipe
    assert Recipe.parse("timm:re=0.25").spec == "timm:none,re=0.25" and Recipe.parse("timm").spec == "timm"


@pytest.mark.parametrize("spec, says", [
    ("timm:rand-m9,bogus=1", "is not key=value with a key of"),
    ("timm:rand-m9,re=abc", "re='abc' does not parse"),
    ("timm:mixmatch", "is not a RandAugment"),
    ("timm:rand-m9+flip", "renders the finished view, so it comes last"),
    ("flip+timm:rand-m9", "renders the whole view"),
])
def test_bad_timm_specs_are_one_line(spec, says):
    with pytest.raises(InvalidSpec, match=says) as err:
        Recipe.parse(spec)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def timm_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    weights = save_cnn_teacher(root, "t.pt", seed=2, scale=10)
    path = precompute(PrecomputeConfig(dataset="fake:24:10:24", teacher="cnn", weights=weights, out=str(root / "c"),
                                       views=2, augment=SPEC + "+cutmix:0.5", progress=False)).path
    return path, weights


def test_a_timm_cache_replays_what_its_teacher_saw(timm_cache, capsys):
    """verify --recompute renders views through the student's path and reruns the teacher: equal outputs."""
    path, weights = timm_cache
    code, out, err = run_cli(["verify", path, "--recompute", "12", "--weights", weights], capsys)
    assert code == 0 and "12 views replayed" in out, err


def test_other_versions_are_refused_in_one_line_or_allowed_with_a_warning(timm_cache, tmp_path, monkeypatch, capsys):
    path, weights = timm_cache
    real = timm_recipe.installed_versions()
    monkeypatch.setattr(timm_recipe, "installed_versions", lambda: {**real, "timm": "0.0.1"})
    timm_recipe._checked.cache_clear()
    argv = ["train", "--dataset", "fake:24:10:24", "--model", "cnn", "--cache", path, "--epochs", "1", "--out",
            str(tmp_path / "s"), "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and f"timm {real['timm']} (now 0.0.1)" in err, err
    with pytest.warns(UserWarning, match="views may differ from the teacher's"):
        code, _, err = run_cli([*argv, "--allow-version-drift"], capsys)
    assert code == 0, err
    with pytest.warns(UserWarning, match="drawn with timm"):
        code, out, err = run_cli(["verify", path, "--recompute", "4", "--weights", weights, "--allow-version-drift"],
                                 capsys)
    assert code == 0 and "4 views replayed" in out, err  # the same timm underneath: the views still match
    with pytest.raises(UnsupportedFormat, match="were drawn with timm"):
        Recipe.from_manifest(open_cache(path).manifest["recipe"]["augment"]).check_versions()


def test_a_timm_recipe_on_grey_images_is_refused_before_anything_is_written(tmp_path, capsys):
    code, _, err = run_cli(["precompute", "--dataset", "digits", "--teacher", "cnn", "--augment", "timm", "--out",
                            str(tmp_path / "c"), "--quiet"], capsys)
    assert code == 2 and "renders RGB images" in err and not (tmp_path / "c").exists(), err


@pytest.mark.parametrize("spec, says", [
    ("timm:rand-q9", "timm does not build a transform from 'rand-q9' \\(AssertionError"),
    ("timm:rand-m9,interp=foo", "timm does not build a transform"),
    ("timm:rand-m9,scale=0.5", "scale='0.5' needs 2 '/'-separated numbers"),
    ("timm:rand-m9,mean=0.5/0.5", "mean='0.5/0.5' needs 3"),
    ("timm:rand-m9,std=0/0/0", "std='0/0/0' needs 3 '/'-separated numbers from 0.001 to 10"),
    ("timm:none,jitter=inf", "jitter='inf' needs a number from 0 to 10"),  # crashed at the first view
    ("timm:none,ratio=1e308/1e308", "ratio='1e308/1e308' needs 2"),
    ("timm:none,mean=nan/nan/nan", "mean='nan/nan/nan' needs 3"),  # wrote a cache of NaN logits
    ("timm:rand-m9-n1000000000", "n1000000000 is not a count from 0 to 16"),  # never finished a view
    ("timm:augmix-m5-w100000000", "w100000000 is not a count"),
    ("timm:none,re=1,recount=1000000000", "recount='1000000000' needs a number from 1 to 16"),
])
def test_what_timm_would_refuse_is_refused_when_the_recipe_is_parsed(spec, says, tmp_path, capsys):
    code, _, err = run_cli(["precompute", "--dataset", "fake:8", "--teacher", "cnn", "--augment", spec, "--out",
                            str(tmp_path / "c"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and re.search(says, err), err
    assert not (tmp_path / "c").exists()


def test_a_missing_package_is_a_version_not_a_traceback(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "timm":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert timm_recipe.installed_versions()["timm"] == "absent"


def test_the_loader_and_extra_views_take_the_drift_flag(timm_cache, monkeypatch):
    from kdcache import loader

    path, _ = timm_cache
    real = timm_recipe.installed_versions()
    monkeypatch.setattr(timm_recipe, "installed_versions", lambda: {**real, "torch": "0.0.1"})
    with pytest.raises(UnsupportedFormat, match="pass --allow-version-drift"):
        loader(path, "fake:24:10:24", batch_size=8)  # refused before any worker starts
    with pytest.warns(UserWarning, match="drawn with torch"):
        batch = next(iter(loader(path, "fake:24:10:24", batch_size=8, allow_version_drift=True)))
    assert batch["input"].shape[-1] == 24


def test_extra_views_of_a_timm_cache_train_under_drift_when_allowed(tmp_path, monkeypatch, capsys):
    weights = save_cnn_teacher(tmp_path, "t.pt", seed=2, scale=10)
    path = precompute(PrecomputeConfig(dataset="fake:24:10:24", teacher="cnn", weights=weights, out=str(tmp_path / "c"),
                                       views=2, augment=SPEC, extra_views="0.5:1", progress=False)).path
    real = timm_recipe.installed_versions()
    monkeypatch.setattr(timm_recipe, "installed_versions", lambda: {**real, "timm": "0.0.1"})
    argv = ["train", "--dataset", "fake:24:10:24", "--model", "cnn", "--cache", path, "--epochs", "1", "--extra-views",
            "--out", str(tmp_path / "s"), "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "--allow-version-drift" in err
    with pytest.warns(UserWarning):
        code, _, err = run_cli([*argv, "--allow-version-drift"], capsys)
    assert code == 0, err


def test_an_edited_manifest_entry_is_one_line_not_a_traceback_or_a_silent_guard():
    """A manifest whose versions were emptied would switch the version check off; options timm cannot build (an
    edit of both spec and options) fail in one line when a view renders (red-team 2026-12-07)."""
    from PIL import Image

    entry = timm_recipe.TimmRecipe.parse(["rand-m9"]).hyper()
    with pytest.raises(InvalidSpec, match=r"records the versions of \[\], not of every package"):
        timm_recipe.TimmRecipe.from_hyper({**entry, "versions": {}})
    with pytest.raises(InvalidSpec, match="records the versions of"):
        timm_recipe.TimmRecipe.from_hyper({**entry, "versions": {k: v for k, v in entry["versions"].items()
                                                                 if k != "timm"}})
    op = timm_recipe.TimmRecipe.from_hyper({**entry, "options": "none,interp=bogus"})
    with pytest.raises(InvalidSpec, match="timm does not build a transform from 'none,interp=bogus'"):
        op.apply_pil(Image.new("RGB", (32, 32)), {"timm": np.int64(1)}, 24)
