"""The student renders the teacher's very pixels (kdcache/views.py ``ViewReplay``).

Every view's uint8 pixels, as the student's loader (``kdcache.loader``) and trainer (``TrainViews`` of a
set-up run) render them, are compared with the teacher's render: for a precompute, the tensors the teacher
pass fed the teacher (captured as they were rendered); for an import, the view the source project's reader
gives (tests/interop_sources.py). Three teachers: a bicubic timm teacher (its pretrained_cfg), an imported
bicubic ml-dr source and a bilinear kdcache one.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from interop_sources import make_folder, mldr_pixels, write_mldr
from tests_support import pillow_before_13, run_cli
from zoo_support import jpeg_folder, timm_hub

from kdcache import data, loader, models
from kdcache.cache.store import open_cache
from kdcache.interop.imported import folder_order
from kdcache.interop.imports import import_cache
from kdcache.student.config import TrainConfig
from kdcache.student.setup import set_up
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer, ViewReplay, row


@pytest.fixture(scope="module", autouse=True)
def _sources_pillow():
    """The sources were rendered under Pillow 9.5-12.2's resize order, which imports replay by default."""
    with pillow_before_13():
        yield

BICUBIC_TIMM = "test_efficientnet.r160_in1k"  # its pretrained_cfg resizes bicubic


def _pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised inputs [..., C, S, S] -> their pixels in levels of 255 (float, for mixed views)."""
    c = x.shape[-3]
    return (x * torch.tensor(std).view(c, 1, 1) + torch.tensor(mean).view(c, 1, 1)) * 255


def _key(i: int, params: dict[str, np.ndarray]) -> tuple:
    return (i, *(np.ascontiguousarray(params[name]).tobytes() for name in sorted(params)))


@contextmanager
def teacher_renders(store: dict):
    """Record every view ``Renderer.batch`` renders (the teacher pass's inputs) as
    ``store[(index, params bytes)] = pixels``."""
    original = Renderer.batch

    def batch(self, indices, params):
        out = original(self, indices, params)
        for j, i in enumerate(indices):
            store[_key(int(i), row(params, j))] = _pixels(out[j], self.mean, self.std)
        return out

    Renderer.batch = batch
    try:
        yield store
    finally:
        Renderer.batch = original


def student_batches(cache_path: str, dataset: str, epochs: int):
    """(index, view, pixels) of every view the student's trainer and the Python loader render."""
    run = set_up(TrainConfig(dataset=dataset, model="cnn", out="unused", cache=cache_path, batch_size=4,
                             progress=False, workers=0))
    for epoch in range(epochs):
        run.stream.set_epoch(epoch)
        for b in run.stream:
            yield from zip(b["index"].tolist(), b["view"].tolist(), _pixels(b["input"], run.pre.mean, run.pre.std))
    stream = loader(cache_path, dataset, batch_size=4)
    for epoch in range(epochs):
        stream.dataset.set_epoch(epoch)
        mean, std = stream.dataset.renderer.mean, stream.dataset.renderer.std
        for b in stream:
            yield from zip(b["index"].tolist(), b["view"].tolist(), _pixels(b["input"], mean, std))


def assert_same_as_teacher(cache_path: str, dataset: str, theirs, exact: bool = True) -> int:
    """Every student view equals ``theirs(i, v)`` (the teacher's pixels); returns the views compared."""
    cache = open_cache(cache_path)
    compared = 0
    for i, v, ours in student_batches(cache_path, dataset, cache.views):
        expected = theirs(cache, i, v)
        if exact:
            assert torch.equal(ours.round(), expected.round()), (i, v)
        assert (ours - expected).abs().max() <= 1e-3, (i, v)
        compared += 1
    assert compared >= 2 * cache.num_samples * cache.views  # trainer and loader, every epoch
    return compared


def captured(store: dict):
    def theirs(cache, i, v):
        params = {k: x[0] for k, x in cache.aug_params(np.array([i]), np.array([v])).items()}
        return store[_key(i, params)]
    return theirs


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_a_bicubic_timm_teachers_views_reach_the_student_pixel_for_pixel(hf_cache, tmp_path):
    timm_hub(hf_cache, BICUBIC_TIMM)
    folder = jpeg_folder(tmp_path / "jpegs", train=3, sides=(170, 230))
    cmap = tmp_path / "map.txt"
    cmap.write_text("n01440764\nn01443537\nn01484850\n")
    dataset = f"imagefolder:{folder}"
    store: dict = {}
    with teacher_renders(store):
        made = precompute(PrecomputeConfig(dataset=dataset, teacher=f"timm:{BICUBIC_TIMM}", weights="pretrained",
                                           class_map=str(cmap), out=str(tmp_path / "c"), views=2, batch_size=4,
                                           decode="reduced", progress=False))
    rec = made.manifest["recipe"]
    assert (rec["interpolation"], rec["input_size"]) == ("bicubic", 160)
    assert_same_as_teacher(made.path, dataset, captured(store))
    views = ViewReplay.of(rec)
    assert views.equals_teacher and views.interpolation == "bicubic" and views.decode == "reduced"


def test_an_imported_bicubic_ml_dr_source_reaches_the_student_as_its_reader_renders_it(tmp_path):
    folder = make_folder(tmp_path / "pets", per_class=3)
    src = tmp_path / "mldr"
    write_mldr(folder, src, views=2, interpolation=3)  # PIL's BICUBIC, as the published configs
    dataset = f"imagefolder:{folder}"
    made = import_cache("ml-dr", str(src), dataset, str(tmp_path / "caches"), progress=False)
    assert open_cache(made.path).manifest["recipe"]["interpolation"] == "bicubic"
    order = folder_order(data.open_source(dataset))
    back = {int(k): t for t, k in enumerate(order)}

    def theirs(cache, i, v):
        return mldr_pixels(folder, src, back[i], v)[0] * 255

    assert_same_as_teacher(made.path, dataset, theirs)


@pytest.fixture(scope="module")
def bilinear(tmp_path_factory) -> tuple[str, str, dict]:
    """A bilinear kdcache teacher's cache of a PNG folder's views (mixed ones included), with its renders."""
    root = tmp_path_factory.mktemp("bilinear")
    torch.manual_seed(0)
    torch.save(models.create_model("cnn", 3, 3).state_dict(), root / "teacher.pt")
    folder = make_folder(root / "pets", per_class=3)
    dataset, store = f"imagefolder:{folder}", {}
    with teacher_renders(store):
        made = precompute(PrecomputeConfig(dataset=dataset, teacher="cnn", weights=str(root / "teacher.pt"),
                                           out=str(root / "c"), views=2, augment="rrc:0.3+flip+mixup:0.5",
                                           teacher_size=24, batch_size=4, progress=False))
    return made.path, dataset, store


def test_a_bilinear_teachers_views_mixed_ones_included_reach_the_student(bilinear):
    path, dataset, store = bilinear
    assert open_cache(path).manifest["recipe"]["interpolation"] == "bilinear"
    assert_same_as_teacher(path, dataset, captured(store), exact=False)


def test_another_size_resizes_the_same_crop_with_the_recorded_interpolation_unless_told(bilinear, tmp_path):
    path, dataset, _ = bilinear
    rec = open_cache(path).manifest["recipe"]
    assert ViewReplay.of(rec, 32) == ViewReplay(32, "bilinear", "full", 24, "bilinear")
    assert not ViewReplay.of(rec, 32).equals_teacher
    assert not ViewReplay.of(rec, None, "bicubic").equals_teacher
    run = set_up(TrainConfig(dataset=dataset, model="cnn", out=str(tmp_path / "r"), cache=path, size=32,
                             interpolation="bicubic", progress=False))
    assert (run.stream.renderer.size, run.stream.renderer.interpolation) == (32, "bicubic")
    assert run.record()["views"] == {"size": 32, "interpolation": "bicubic", "decode": "full",
                                     "equals_teacher": False}


def test_train_says_first_what_the_student_renders(bilinear, tmp_path, capsys):
    path, dataset, _ = bilinear
    code, out, err = run_cli(["train", "--dataset", dataset, "--model", "cnn", "--cache", path, "--epochs", "1",
                              "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == "views: the teacher's own (24 px, bilinear, full decode)"
    code, out, err = run_cli(["train", "--dataset", dataset, "--model", "cnn", "--cache", path, "--epochs", "1",
                              "--size", "16", "--out", str(tmp_path / "r2")], capsys)
    assert code == 0, err
    assert err.splitlines()[0].startswith("views: the teacher's crops at 16 px, bilinear, full decode — not the")


def test_verify_recompute_renders_through_the_students_path(bilinear, monkeypatch, capsys):
    path, _, _ = bilinear
    weights = str(Path(path).parent.parent / "teacher.pt")
    code, out, err = run_cli(["verify", path, "--recompute", "6", "--weights", weights], capsys)
    assert code == 0, out + err
    drifted = ViewReplay.of

    def bicubic(recipe, size=None, interpolation=None):
        return drifted(recipe, size, "bicubic")

    monkeypatch.setattr(ViewReplay, "of", staticmethod(bicubic))  # the student's renderer made to differ
    code, out, err = run_cli(["verify", path, "--recompute", "6", "--weights", weights], capsys)
    assert code != 0 and "replays (recipe rrc:0.3+flip+mixup:0.5) to outputs that differ" in out + err
