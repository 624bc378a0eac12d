"""Growing a cache: an extended cache equals a one-shot build, the teacher runs only on what is new,
and the cache stays readable while it grows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from kdcache_cli.main import app
from tests_support import forge_stale_lock, precompute_config, run_cli
from typer.testing import CliRunner

from kdcache.cache.lock import WriterLock
from kdcache.cache.store import open_cache
from kdcache.errors import InvalidSpec, WeightsMismatch
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.extend import extend
from kdcache.teacher.precompute import precompute

DATASET = "fake:64"


def config(out, weights, **kw) -> PrecomputeConfig:
    return precompute_config(out, weights, **({"dataset": DATASET, "views": 2} | kw))


def assert_same_arrays(a, b) -> None:
    assert sorted(a.array_names) == sorted(b.array_names)
    for name in ["labels", *a.array_names]:
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)


@pytest.mark.parametrize("kw", [{}, {"logits": "sampled:20", "features": ("layer1",)}])
def test_extended_cache_equals_a_one_shot_build_and_runs_the_teacher_only_on_new_views(tmp_path, teacher_weights,
                                                                                       kw):
    small = precompute(config(tmp_path / "grow", teacher_weights, **kw))
    reader = open_cache(small.path)  # opened before the extension: keeps reading the first views
    before = reader.read_block(reader.target_arrays(), 0, 64, 1)
    seen = []
    result = extend(small.path, views=5, batch_size=40, progress=False, on_batch=lambda x, z: seen.append(len(x)))
    assert sum(seen) == result.views_computed == 64 * 3
    one_shot = precompute(config(tmp_path / "once", teacher_weights, views=5, **kw))
    grown = open_cache(small.path)
    assert result.cache_id == one_shot.cache_id == grown.id and result.previous_id == small.cache_id
    assert grown.views == 5 and grown.manifest["history"][-1]["views"] == [2, 5]
    assert_same_arrays(grown, open_cache(one_shot.path))
    for name, values in reader.read_block(reader.target_arrays(), 0, 64, 1).items():
        np.testing.assert_array_equal(values, before[name])
    # precompute with the final settings finds the extended cache through its new alias
    again = precompute(config(tmp_path / "grow", teacher_weights, views=5, **kw))
    assert again.reused and again.cache_id == result.cache_id


def test_adding_features_equals_a_one_shot_build(tmp_path, teacher_weights):
    small = precompute(config(tmp_path / "grow", teacher_weights))
    seen = []
    result = extend(small.path, views=3, features=["layer2:pooled"], progress=False,
                    on_batch=lambda x, z: seen.append(len(x)))
    assert sum(seen) == 64 * 3  # new features need every view
    one_shot = precompute(config(tmp_path / "once", teacher_weights, views=3, features=("layer2:pooled",)))
    assert result.cache_id == one_shot.cache_id
    assert_same_arrays(open_cache(small.path), open_cache(one_shot.path))


def test_extend_refuses_other_weights_fewer_views_and_nothing_to_do(tmp_path, teacher_weights):
    import torch

    from kdcache import models

    small = precompute(config(tmp_path, teacher_weights))
    other = tmp_path / "other.pt"
    torch.save(models.create_model("cnn", 10, 3).state_dict(), other)
    with pytest.raises(WeightsMismatch, match="pass the weights the cache was made with"):
        extend(small.path, views=3, weights=[str(other)], progress=False)
    with pytest.raises(InvalidSpec, match="fewer than the cache's 2"):
        extend(small.path, views=1, progress=False)
    with pytest.raises(InvalidSpec, match="nothing to extend"):
        extend(small.path, progress=False)
    assert open_cache(small.path).views == 2


def test_cli_extend_prints_the_new_id_and_ls_json_shows_it(tmp_path, teacher_weights):
    small = precompute(config(tmp_path, teacher_weights))
    runner = CliRunner()
    result = runner.invoke(app, ["extend", small.path, "--views", "3", "--weights", teacher_weights, "--quiet"])
    assert result.exit_code == 0, result.output
    grown = open_cache(small.path)
    assert grown.id in result.stdout and grown.views == 3
    listed = runner.invoke(app, ["ls", str(tmp_path), "--json"])
    assert [row["views"] for row in json.loads(listed.stdout)] == [3]


def test_precompute_with_the_old_settings_explains_that_the_cache_was_extended(tmp_path, teacher_weights):
    from kdcache.errors import CacheMismatch

    small = precompute(config(tmp_path, teacher_weights))
    extend(small.path, views=3, progress=False)
    with pytest.raises(CacheMismatch, match="was extended into cache .* train from it"):
        precompute(config(tmp_path, teacher_weights))


@pytest.mark.parametrize("logits", ["dense", "sampled:20"])
def test_adding_an_ensemble_member_runs_only_it_and_equals_a_one_shot_ensemble(tmp_path, teacher_weights, logits):
    import torch

    from kdcache import models
    from kdcache.teacher.extend import add_members

    torch.manual_seed(7)
    third = tmp_path / "third.pt"
    torch.save(models.create_model("cnn", 10, 3).state_dict(), third)
    kw = dict(logits=logits, logit_dtype="float32", keep_members=True)
    pair = precompute(config(tmp_path / "grow", (teacher_weights, teacher_weights), teacher=("cnn", "cnn"), **kw))
    seen = []
    result = add_members(pair.path, ["cnn"], [str(third)], batch_size=40, progress=False,
                         on_batch=lambda x, z: seen.append(len(x)))
    assert sum(seen) == 64 * 2  # one new member over every view; the stored members are not rerun
    trio = precompute(config(tmp_path / "once", (teacher_weights, teacher_weights, str(third)),
                             teacher=("cnn", "cnn", "cnn"), **kw))
    assert result.cache_id == trio.cache_id
    assert_same_arrays(open_cache(pair.path), open_cache(trio.path))


def test_adding_a_member_needs_kept_members(tmp_path, teacher_weights):
    from kdcache.teacher.extend import add_members

    small = precompute(config(tmp_path, teacher_weights))
    with pytest.raises(InvalidSpec, match="--keep-members"):
        add_members(small.path, ["cnn"], [teacher_weights], progress=False)


def test_cli_extend_stops_for_a_live_writer_and_break_lock_takes_over_a_stale_one(tmp_path, teacher_weights, capsys):
    path = precompute(config(tmp_path, teacher_weights)).path
    holder = WriterLock(path, heartbeat=3600).acquire()  # a writer that will stop beating
    try:
        code, _, err = run_cli(["extend", path, "--views", "3", "--quiet"], capsys)
        assert code == 2 and "is being written by" in err and len(err.strip().splitlines()) == 1
        forge_stale_lock(path)
        code, out, err = run_cli(["extend", path, "--views", "3", "--quiet", "--break-lock"], capsys)
        assert code == 0 and "extended to" in out, err
    finally:
        holder.release()
    assert open_cache(path).views == 3


@pytest.mark.parametrize("argv, says", [
    (["precompute", "--he-extra", "2:1"], "--extra-views '2:1' needs 0 < R <= 1"),
    (["train", "--he-da"], "no energy-guided extra views"),
])
def test_the_old_extra_view_flags_still_work_as_hidden_aliases(argv, says, cache_path, teacher_weights, tmp_path,
                                                                capsys):
    common = {"precompute": ["--dataset", "fake:64", "--teacher", "cnn", "--weights", teacher_weights,
                             "--out", str(tmp_path)],
              "train": ["--dataset", "fake:64", "--model", "cnn", "--out", str(tmp_path / "run"), "--cache", cache_path,
                        "--epochs", "1"]}[argv[0]]
    code, _, err = run_cli([argv[0], *common, *argv[1:], "--quiet"], capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
