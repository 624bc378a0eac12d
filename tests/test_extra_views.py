"""Energy-guided extra views: `precompute --extra-views R:K2`, cached mixed views, `train --extra-views`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from tests_support import precompute_config, run_cli, save_cnn_teacher

from kdcache import data, models
from kdcache.audit import recompute
from kdcache.augment import Recipe
from kdcache.cache.integrity import verify
from kdcache.cache.logits import decode_logits
from kdcache.cache.store import open_cache
from kdcache.cache.view_sets import EXTRA_VIEW_BASE
from kdcache.errors import InvalidSpec
from kdcache.student.extra_views import with_extra_views
from kdcache.teacher.config import PrecomputeConfig, parse_extra_views
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer

DATASET = "fake:64"


def config(out, weights, **kw) -> PrecomputeConfig:
    return precompute_config(out, weights, **({"dataset": DATASET, "batch_size": 64} | kw))


class Recording(torch.nn.Module):
    """A teacher that remembers every input batch it was run on."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.net(x)


@pytest.fixture(scope="module")
def he_cache(tmp_path_factory, teacher_weights) -> tuple[str, Recording]:
    """A 3-view cache of fake:64 whose highest-energy quarter has 2 extra cutmix views, and its teacher."""
    net = models.create_model("cnn", 10, 3)
    models.load_weights(net, teacher_weights)
    teacher = Recording(net)
    result = precompute(config(tmp_path_factory.mktemp("he"), teacher_weights, extra_views="0.25:2"), teacher=teacher)
    return result.path, teacher


def test_the_chosen_samples_are_exactly_the_top_fraction_by_mean_energy(he_cache):
    cache = open_cache(he_cache[0])
    mean = cache.all_energy(4.0).astype(np.float64).mean(axis=1)
    expected = np.sort(np.argsort(-mean, kind="stable")[:16])
    chosen = cache.group["he/indices"][:]
    assert np.array_equal(chosen, expected)
    he = cache.manifest["he"]
    assert he["samples"] == 16 and he["views"] == 2
    assert he["threshold_energy"] == pytest.approx(mean[chosen].min())
    assert mean[chosen].min() >= mean[np.setdiff1d(np.arange(64), chosen)].max()
    entry = cache.manifest["recipe"]["he_extra"]
    assert (entry["fraction"], entry["views"], entry["op"], entry["energy_temperature"]) == (0.25, 2, "cutmix", 4.0)
    assert entry["augment"]["spec"] == "rrc+flip+cutmix"
    assert cache.group["he/logits"].shape == (16, 2, 10) and cache.group["he/aug/cutmix_box"].shape == (16, 2, 4)


def test_he_extra_is_part_of_the_cache_id(he_cache, cache_path):
    assert open_cache(he_cache[0]).id != open_cache(cache_path).id


def test_a_mixed_views_cached_logits_equal_the_teacher_on_the_replayed_mixed_image(he_cache):
    path, teacher = he_cache
    cache = open_cache(path)
    seen = teacher.inputs[-1]  # the HE stage runs last: 16 samples x 2 views in one batch, row-major
    assert len(seen) == 32
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["he_extra"]["augment"])
    rows, views = np.repeat(np.arange(16), 2), np.tile(np.arange(2), 16)
    params = {name: cache.read_views(f"he/aug/{name}", rows, views) for name in recipe.fields()}
    samples = cache.group["he/indices"][:][rows]
    fresh = recipe.sample(0, samples, EXTRA_VIEW_BASE + views, 64)
    assert all(np.array_equal(params[k], fresh[k]) for k in fresh)  # pure in (seed, i, VIEW_BASE + v)
    assert (params["cutmix_partner"] >= 0).all() and (params["cutmix_lam"] < 1).any()
    source = data.open_source(DATASET)
    replayed = Renderer(source.train, recipe, 32, source.mean, source.std).batch(samples, params)
    assert torch.equal(replayed, seen)  # bit-identical input
    with torch.no_grad():
        logits = teacher.net(replayed).numpy()
    cached = decode_logits(cache.read_views("he/logits", rows, views), "float16")
    np.testing.assert_allclose(cached, logits, rtol=2**-10, atol=2**-10)


def test_extra_view_params_never_collide_with_regular_views(he_cache):
    cache = open_cache(he_cache[0])
    assert EXTRA_VIEW_BASE > 2**30  # far beyond any regular view index a cache holds or grows to
    regular = cache.group["aug/rrc"][:].reshape(-1, 4)
    extra = cache.group["he/aug/rrc"][:].reshape(-1, 4)
    assert not any((regular == row).all(axis=1).any() for row in extra)


def test_replay_verification_covers_the_extra_views(teacher_weights, tmp_path):
    copy = precompute(config(tmp_path, teacher_weights, views=2, extra_views="0.25:2")).path
    assert recompute(str(copy), 1000, [teacher_weights]).ok
    zarr.open_group(str(copy), mode="r+")["he/aug/cutmix_box"][5, 1] = np.array([0, 0, 0.5, 0.5], np.float32)
    problems = recompute(str(copy), 1000, [teacher_weights]).problems
    assert len(problems) == 1 and problems[0].array == "he/aug/cutmix_box"
    assert "extra view 1" in problems[0].what and "op cutmix" in problems[0].what


def test_mixup_is_an_option_and_a_rerun_reuses_the_cache(tmp_path, teacher_weights):
    result = precompute(config(tmp_path, teacher_weights, views=2, extra_views="0.5:1:mixup"))
    entry = result.manifest["recipe"]["he_extra"]
    assert entry["augment"]["spec"] == "rrc+flip+mixup" and entry["augment"]["ops"][-1]["alpha"] == 0.2
    assert result.views_computed == 64 * 2 + 32
    again = precompute(config(tmp_path, teacher_weights, views=2, extra_views="0.5:1:mixup"))
    assert again.reused and again.views_computed == 0


@pytest.mark.parametrize("text", ["0:4", "1.5:4", "0.5", "0.5:0", "0.5:2:trivial", "half:2"])
def test_a_bad_he_extra_spec_is_a_one_line_error(text):
    with pytest.raises(InvalidSpec, match="--extra-views"):
        parse_extra_views(text)


def test_train_he_da_runs_from_a_cache_with_no_weights_file_present(tmp_path, teacher_weights, capsys):
    weights = tmp_path / "teacher.pt"
    shutil.copy(teacher_weights, weights)
    result = precompute(config(tmp_path / "root", str(weights), views=2, extra_views="0.25:2"))
    weights.unlink()
    code, _, err = run_cli(["train", "--dataset", DATASET, "--model", "cnn", "--out", str(tmp_path / "run"),
                            "--cache", result.path, "--extra-views", "--epochs", "1", "--batch-size", "16",
                            "--quiet"], capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["extra_views"] and run["train_samples"] == 64 + 16  # one extra view per chosen sample per epoch


def test_he_da_on_a_cache_without_extra_views_is_a_one_line_error(cache_path, tmp_path, capsys):
    code, _, err = run_cli(["train", "--dataset", DATASET, "--model", "cnn", "--out", str(tmp_path / "run"),
                            "--cache", cache_path, "--extra-views", "--epochs", "1", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no energy-guided extra views" in err and "--extra-views" in err


def test_verify_reads_the_extra_view_arrays_and_names_a_damaged_chunk(tmp_path, teacher_weights, capsys):
    path = precompute(config(tmp_path, teacher_weights, views=2, extra_views="0.25:2")).path
    code, out, _ = run_cli(["verify", path], capsys)
    assert code == 0 and "intact" in out
    chunk = tmp_path / path.rpartition("/")[2] / "he" / "energy" / "c" / "0" / "1" / "0"
    chunk.unlink()
    code, out, _ = run_cli(["verify", path], capsys)
    assert code == 1 and "BAD  he/energy: chunk file missing [chunk he/energy/c/0/1/0]" in out


def he_da_stream(he_cache, batch_size: int):
    """(cache, regular stream, regular + extra views) of ``he_cache``, batched as ``train --he-da`` does."""
    from kdcache.student.reader import TrainViews

    cache = open_cache(he_cache[0])
    source = data.open_source(DATASET)
    regular = TrainViews(Renderer(source.train, Recipe.parse("rrc+flip"), 32, source.mean, source.std),
                         source.train.labels, 16, 0, cache.path, ["logits"], 3, batch_size=batch_size)
    return cache, regular, with_extra_views(regular, cache, source.train, regular.renderer.preprocess)


def test_the_he_da_stream_adds_one_mixed_view_per_chosen_sample_with_soft_label_info(he_cache):
    cache, _, stream = he_da_stream(he_cache, 16)
    batches = list(stream)
    extra = [b for b in batches if (b["view"] >= EXTRA_VIEW_BASE).all()]
    assert sum(len(b["label"]) for b in batches) == len(stream) == 64 + 16
    index = torch.cat([b["index"] for b in extra]).numpy()
    assert np.array_equal(np.sort(index), cache.group["he/indices"][:])
    assert all((b["lam"] < 1).any() and b["teacher/logits"].shape[1] == 10 for b in extra)


def test_an_interrupted_he_stage_resumes_without_recomputing_the_regular_views(tmp_path, teacher_weights):
    first = precompute(config(tmp_path, teacher_weights, views=2, extra_views="0.5:2", chunk_samples=8))
    group = zarr.open_group(first.path, mode="r+")
    written = group["he/logits"][:]
    assert group["he/status"].shape == (1,)
    group["he/status"][0] = 0
    group["he/logits"][:] = 0
    group.attrs["kdcache"] = group.attrs["kdcache"] | {"status": "writing"}
    again = precompute(config(tmp_path, teacher_weights, views=2, extra_views="0.5:2", chunk_samples=8))
    assert not again.reused and again.views_computed == 32 * 2  # the extra views only
    assert np.array_equal(zarr.open_group(first.path, mode="r")["he/logits"][:], written)
    assert open_cache(first.path).complete


def test_the_he_da_stream_counts_its_batches_as_it_yields_them(he_cache):
    # The two streams are batched apart, so an epoch has ceil(64/20) + ceil(16/20) = 5 batches, not
    # ceil(80/20) = 4: the LR schedule is built from this count.
    _, regular, stream = he_da_stream(he_cache, 20)
    assert stream.num_batches() == len(list(stream)) == 5
    assert regular.num_batches() == 4


def test_extra_views_of_an_ensemble_with_kept_members_store_the_members_logits_too(tmp_path, teacher_weights):
    second = save_cnn_teacher(tmp_path, "second.pt", seed=77, scale=10)
    cfg = config(tmp_path / "root", (teacher_weights, second), teacher=("cnn", "cnn"), keep_members=True, views=2,
                 extra_views="0.25:2")
    cache = open_cache(precompute(cfg).path)
    assert verify(cache.path).ok  # before the one teacher pass, he/members/* were laid out but never written
    members = cache.read_array("he/members/1/logits")
    assert members.shape == (16, 2, 10) and np.abs(decode_logits(members, "float16")).sum() > 0
