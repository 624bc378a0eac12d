"""Stage 2: training from a cache and alone, evaluation, checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import kdcache.train

from kdcache import models
from kdcache.errors import CacheCorrupt, CacheMismatch, InvalidSpec
from kdcache.precompute import PrecomputeConfig, precompute
from kdcache.store import open_cache
from kdcache.train import TrainConfig, evaluate_weights, expected_calibration_error, train
from kdcache.views import plan_epoch

DATASET = "fake:64"


def cfg(out, **kw) -> TrainConfig:
    base = dict(dataset=DATASET, model="cnn", out=str(out), epochs=2, batch_size=16, lr=0.05, progress=False)
    return TrainConfig(**(base | kw))


def test_training_alone_writes_model_and_one_metrics_line_per_epoch(tmp_path):
    result = train(cfg(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[-1])
    for key in ("loss", "ce", "train_top1", "test_top1", "test_top5", "test_ece", "images_per_s"):
        assert key in record
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    net = models.create_model("cnn", 10, 3)
    net.load_state_dict(state)
    assert result.final == record


def test_training_from_cache_needs_no_teacher_weights(tmp_path, teacher_weights):
    weights = tmp_path / "teacher.pt"
    shutil.copy(teacher_weights, weights)
    cache = precompute(PrecomputeConfig(dataset=DATASET, teacher="cnn", weights=str(weights),
                                        out=str(tmp_path / "c"), views=2, progress=False))
    os.remove(weights)
    result = train(cfg(tmp_path / "run", cache=cache.path, loss="kd"))
    assert {"kd", "ce", "teacher_agreement"} <= set(result.final)
    assert np.isfinite(result.final["loss"])


def test_kd_from_cache_moves_student_towards_teacher(tmp_path, cache_path):
    """The KD term must fall as the student imitates the cached teacher outputs."""
    result = train(cfg(tmp_path / "run", cache=cache_path, loss="kd", epochs=4, lr=0.1,
                       loss_params={"ce_weight": 0.0, "kd_weight": 1.0}))
    kd = [m["kd"] for m in result.metrics]
    assert kd[-1] < kd[0]


def test_each_epoch_uses_one_view_per_block_and_cycles_all_views():
    seen = {}
    for epoch in range(6):
        for block in plan_epoch(64, 16, 3, seed=0, epoch=epoch):
            seen.setdefault(block.start, []).append(block.view)
    for views in seen.values():
        assert sorted(views[:3]) == [0, 1, 2] and sorted(views[3:]) == [0, 1, 2]


def test_epoch_plan_splits_blocks_between_ranks_without_overlap():
    blocks = [plan_epoch(100, 16, 4, 0, 3, rank=r, world=2) for r in range(2)]
    starts = [b.start for part in blocks for b in part]
    assert sorted(starts) == list(range(0, 100, 16))


def test_training_refuses_a_cache_of_another_dataset(tmp_path, cache_path):
    with pytest.raises(CacheMismatch, match="made from dataset fake:64"):
        train(cfg(tmp_path / "run", dataset="fake:65", cache=cache_path))


def test_training_refuses_an_incomplete_cache(tmp_path, teacher_weights):
    out = tmp_path / "c"

    def crash(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        precompute(PrecomputeConfig(dataset=DATASET, teacher="cnn", weights=teacher_weights, out=str(out),
                                    views=2, progress=False), on_batch=crash)
    with pytest.raises(CacheCorrupt, match="incomplete"):
        train(cfg(tmp_path / "run", cache=str(out)))


def test_loss_that_needs_a_teacher_is_refused_without_cache(tmp_path):
    with pytest.raises(InvalidSpec, match="--cache"):
        train(cfg(tmp_path / "run", loss="kd"))


@pytest.mark.parametrize("change", [dict(epochs=0), dict(batch_size=0), dict(optimizer="lbfgs"),
                                    dict(loss="nosuchloss"), dict(model="nosuchnet")])
def test_bad_training_options_are_clear_errors(tmp_path, change):
    with pytest.raises(InvalidSpec) as info:
        train(cfg(tmp_path / "run", **change))
    assert "\n" not in str(info.value)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, cache_path, monkeypatch):
    full = train(cfg(tmp_path / "full", cache=cache_path, epochs=3))
    real_evaluate, calls = kdcache.train.evaluate, []

    def crash_in_third_epoch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(kdcache.train, "evaluate", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "part", cache=cache_path, epochs=3))
    monkeypatch.setattr(kdcache.train, "evaluate", real_evaluate)
    resumed = train(cfg(tmp_path / "part", cache=cache_path, epochs=3, resume=True))
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [m["epoch"] for m in resumed.metrics] == [1, 2, 3]


def test_evaluate_weights_reports_top1_top5_ece(tmp_path, teacher_weights):
    result = evaluate_weights("cnn", teacher_weights, DATASET, "test")
    assert set(result) == {"top1", "top5", "ece", "loss"}
    assert 0 <= result["top1"] <= result["top5"] <= 100 and 0 <= result["ece"] <= 1


def test_ece_of_a_perfectly_calibrated_split_is_zero_and_of_overconfidence_is_the_gap():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(probs, torch.tensor([0, 0])) == pytest.approx(0.1)
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.4)


def test_student_at_another_resolution_trains_from_the_stored_boxes(tmp_path, cache_path):
    result = train(cfg(tmp_path / "run", cache=cache_path, size=16, epochs=1))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["size"] == 16
    assert open_cache(cache_path).manifest["recipe"]["input_size"] == 32
    assert np.isfinite(result.final["loss"])
