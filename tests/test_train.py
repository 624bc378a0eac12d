"""Stage 2: training from a cache and alone, evaluation, checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import kdcache.student.train
from kdcache import data, losses, models
from kdcache.augment import Recipe
from kdcache.cache.store import open_cache
from kdcache.errors import CacheCorrupt, CacheMismatch, InvalidSpec
from kdcache.student import robust
from kdcache.student.config import TrainConfig
from kdcache.student.evaluate import evaluate_weights, expected_calibration_error
from kdcache.student.reader import TrainViews, plan_epoch
from kdcache.student.train import train
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer

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
    (partial,) = [p for p in out.iterdir() if p.is_dir()]
    with pytest.raises(CacheCorrupt, match="incomplete"):
        train(cfg(tmp_path / "run", cache=str(partial)))


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
    real_evaluate, calls = kdcache.student.train.evaluate, []

    def crash_in_third_epoch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(kdcache.student.train, "evaluate", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "part", cache=cache_path, epochs=3))
    monkeypatch.setattr(kdcache.student.train, "evaluate", real_evaluate)
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


# ---- robust-training settings ----------------------------------------------------------------
def test_label_noise_gives_exactly_the_fraction_a_different_class_and_is_seeded():
    labels = np.arange(1000) % 10
    noisy = robust.noisy_labels(labels, 0.3, 10, seed=5)
    changed = noisy != labels
    assert changed.sum() == 300
    assert np.bincount(noisy[changed], minlength=10).min() > 0  # wrong classes spread over all classes
    assert np.array_equal(noisy, robust.noisy_labels(labels, 0.3, 10, seed=5))
    assert not np.array_equal(noisy, robust.noisy_labels(labels, 0.3, 10, seed=6))
    assert np.array_equal(robust.noisy_labels(labels, 0.0, 10, seed=5), labels)


def test_label_noise_among_kept_samples_corrupts_only_those():
    labels = np.arange(200) % 4
    kept = np.arange(0, 200, 2)
    noisy = robust.noisy_labels(labels, 0.5, 4, seed=0, among=kept)
    assert (noisy != labels).sum() == 50 and set(np.flatnonzero(noisy != labels)) <= set(kept)


def test_imbalance_keeps_the_exponential_long_tail_profile_and_is_seeded():
    labels = np.repeat(np.arange(5), 100)
    kept = robust.long_tail_indices(labels, 10.0, 5, seed=1)
    counts = np.bincount(labels[kept], minlength=5)
    assert counts.tolist() == [100, 56, 31, 17, 10]  # floor(100 * 10^(-c/4))
    assert np.array_equal(kept, robust.long_tail_indices(labels, 10.0, 5, seed=1))
    assert not np.array_equal(kept, robust.long_tail_indices(labels, 10.0, 5, seed=2))
    assert len(robust.long_tail_indices(labels, 1.0, 5, seed=1)) == 500


@pytest.mark.parametrize("change", [dict(label_noise=1.5), dict(imbalance=0.5), dict(warmup_epochs=-1),
                                    dict(grad_clip=0.0), dict(teacher_weights="t.pt")])
def test_bad_robust_and_optimiser_settings_are_one_line_errors(tmp_path, change):
    with pytest.raises(InvalidSpec) as info:
        train(cfg(tmp_path / "run", **change))
    assert "\n" not in str(info.value)


def test_long_tailed_training_reads_only_the_kept_samples(tmp_path, cache_path):
    source = data.open_source(DATASET)
    kept = robust.long_tail_indices(source.train.labels, 4.0, 10, seed=0)
    renderer = Renderer(source.train, Recipe.parse("rrc+flip"), 16, source.mean, source.std)
    keep = np.isin(np.arange(64), kept)
    stream = TrainViews(renderer, source.train.labels, 16, seed=0, keep=keep, batch_size=8)
    assert sorted(torch.cat([batch["index"] for batch in stream]).tolist()) == kept.tolist()
    assert len(stream) == len(kept)
    result = train(cfg(tmp_path / "run", cache=cache_path, imbalance=4.0))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train_samples"] == len(kept)
    assert np.isfinite(result.final["loss"])


def test_label_noise_changes_the_labels_the_student_sees_but_not_the_cache(tmp_path, cache_path):
    before = open_cache(cache_path).labels()
    clean = train(cfg(tmp_path / "clean", loss="ce", cache=cache_path, epochs=1))
    noisy = train(cfg(tmp_path / "noisy", loss="ce", cache=cache_path, epochs=1, label_noise=0.5))
    assert noisy.final["ce"] != pytest.approx(clean.final["ce"], rel=1e-3)
    assert np.array_equal(open_cache(cache_path).labels(), before)


# ---- trainer options ---------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(optimizer="adamw", lr=1e-3, schedule="step"),
                                     dict(schedule="constant", warmup_epochs=1, grad_clip=1.0)])
def test_optimisers_schedules_warmup_and_clipping_train(tmp_path, options):
    result = train(cfg(tmp_path / "run", **options))
    assert all(np.isfinite(m["loss"]) for m in result.metrics)
    if options.get("warmup_epochs"):
        assert result.metrics[0]["lr"] == pytest.approx(0.05)  # warm-up reaches the peak at its end


def test_resume_refuses_other_settings_than_the_run_was_started_with(tmp_path):
    train(cfg(tmp_path / "run", epochs=1))
    with pytest.raises(InvalidSpec, match="lr"):
        train(cfg(tmp_path / "run", epochs=1, lr=0.1, resume=True))


# ---- online teacher ----------------------------------------------------------------------------
def test_online_teacher_trains_without_a_cache_on_live_views(tmp_path, teacher_weights):
    result = train(cfg(tmp_path / "run", online_teacher="cnn", teacher_weights=teacher_weights, loss="kd"))
    assert {"kd", "ce", "teacher_agreement"} <= set(result.final)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["online_teacher_sha256"].startswith("sha256:")


def test_online_teacher_refuses_a_loss_that_needs_cached_outputs(tmp_path, teacher_weights):
    with pytest.raises(InvalidSpec, match="energy"):
        train(cfg(tmp_path / "run", online_teacher="cnn", teacher_weights=teacher_weights, loss="energy_kd"))


# ---- every loss from a real cache ------------------------------------------------------------------
@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory, teacher_weights) -> str:
    """2 CutMix views of fake:64 with dense float32 logits, energies, layer1 attention and layer2 full maps."""
    root = tmp_path_factory.mktemp("features")
    return precompute(PrecomputeConfig(dataset=DATASET, teacher="cnn", weights=teacher_weights, out=str(root),
                                       views=2, augment="rrc+flip+cutmix:0.5", logit_dtype="float32",
                                       features=("layer1:attention", "layer2:full"), chunk_samples=32,
                                       progress=False)).path


ONE_STEP = {  # loss -> (loss params, student layers); fake:64 in one batch of 64 is one optimiser step
    **{cls.name: ({}, ()) for cls in losses.available()},
    "dkd": ({"warmup": 1}, ()),
    "energy_dkd": ({"warmup": 1}, ()),
    "energy_kd": ({"mapping": "code"}, ()),
    "fitnet": ({}, ("layer1",)),  # student layer1 (16 channels) -> teacher layer2 (32): the adaptor bridges them
}


@pytest.mark.parametrize("name", sorted(ONE_STEP))
def test_each_loss_trains_one_step_from_a_real_cache(tmp_path, feature_cache, name):
    params, layers = ONE_STEP[name]
    torch.manual_seed(0)
    initial = models.create_model("cnn", 10, 3).state_dict()
    result = train(cfg(tmp_path / "run", cache=feature_cache, loss=name, loss_params=params, student_layers=layers,
                       epochs=1, batch_size=64))
    final = result.final
    terms = set(final) - {"epoch", "loss", "train_top1", "teacher_agreement", "test_top1", "test_top5", "test_ece",
                          "test_loss", "lr", "images_per_s", "seconds"}
    assert terms and np.isfinite(final["loss"])
    assert final["loss"] == pytest.approx(sum(final[t] for t in terms), rel=1e-5)
    assert 0 <= final["teacher_agreement"] <= 100
    changed = [k for k, v in result.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert changed, "one optimiser step must move the student"
    hparams = json.loads((tmp_path / "run" / "run.json").read_text())["hparams"]
    assert all(str(hparams[k]) == str(v) for k, v in params.items())


def test_feature_losses_pair_student_layers_with_the_cached_teacher_layers(tmp_path, feature_cache):
    train(cfg(tmp_path / "amd", cache=feature_cache, loss="amd", epochs=1, batch_size=64))
    # amd reads attention maps, or computes them from full ones: both cached layers pair by name
    assert json.loads((tmp_path / "amd" / "run.json").read_text())["hparams"]["layers"] == ["layer1", "layer2"]
    train(cfg(tmp_path / "fit", cache=feature_cache, loss="fitnet", student_layers=("layer1",), epochs=1,
              batch_size=64))
    assert json.loads((tmp_path / "fit" / "run.json").read_text())["hparams"]["layers"] == ["layer1=layer2"]
    with pytest.raises(InvalidSpec, match="no layer 'block9'"):
        train(cfg(tmp_path / "bad", cache=feature_cache, loss="fitnet", student_layers=("block9",)))
    with pytest.raises(InvalidSpec, match="one --student-layer per teacher layer"):
        train(cfg(tmp_path / "bad", cache=feature_cache, loss="fitnet", student_layers=("layer1", "layer2")))


def test_exported_model_is_the_student_alone_and_the_checkpoint_keeps_the_adaptor(tmp_path, feature_cache):
    train(cfg(tmp_path / "run", cache=feature_cache, loss="fitnet", student_layers=("layer1",), epochs=1,
              batch_size=64))
    exported = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert set(exported) == set(models.create_model("cnn", 10, 3).state_dict())
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["loss"]["adaptors.0.weight"].shape == (32, 16, 1, 1)
    group = checkpoint["optimizer"]["param_groups"][0]["params"]
    assert len(group) == len(list(models.create_model("cnn", 10, 3).parameters())) + 2  # + adaptor weight, bias


@pytest.mark.parametrize("loss, words", [("amd", "attention maps"), ("fitnet", "full feature maps")])
def test_feature_loss_on_a_cache_without_features_says_how_to_make_one(tmp_path, cache_path, loss, words):
    with pytest.raises(CacheMismatch) as info:
        train(cfg(tmp_path / "run", cache=cache_path, loss=loss))
    assert str(info.value) == (f"loss {loss} needs {words} of a teacher layer; this cache has none — re-run "
                               f"precompute with --features layer3:{'attention' if loss == 'amd' else 'full'}")


def test_online_teacher_gives_the_loss_of_a_float32_cache(tmp_path, feature_cache, teacher_weights):
    """Same views, same teacher: the cache and the online forward pass give one training run (a float16 cache
    is off by about 1e-4 in the loss and 1e-5 in the weights, so these tolerances tell the two apart)."""
    cached = train(cfg(tmp_path / "cached", cache=feature_cache, loss="kd", epochs=2))
    online = train(cfg(tmp_path / "online", cache=feature_cache, loss="kd", epochs=2, online_teacher="cnn",
                       teacher_weights=teacher_weights))
    for a, b in zip(cached.metrics, online.metrics, strict=True):
        for key in ("loss", "ce", "kd", "train_top1", "teacher_agreement", "test_top1"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key
    for key, value in cached.model.state_dict().items():
        assert torch.allclose(value.float(), online.model.state_dict()[key].float(), rtol=0, atol=1e-6), key


@pytest.mark.parametrize("mode", ["topk:3", "sampled:20"])
def test_every_logit_loss_trains_from_a_sparse_cache(tmp_path, teacher_weights, mode):
    sparse = precompute(PrecomputeConfig(dataset=DATASET, teacher="cnn", weights=teacher_weights,
                                         out=str(tmp_path / "c"), views=2, logits=mode, progress=False)).path
    for loss in ("kd", "dr", "dkd", "nkd", "dist", "cskd", "r2kd", "energy_kd", "energy_dkd", "pld", "mixkd"):
        result = train(cfg(tmp_path / loss, cache=sparse, loss=loss, epochs=1, batch_size=32))
        assert np.isfinite(result.final["loss"]) and 0 <= result.final["teacher_agreement"] <= 100, loss


def test_train_command_passes_teacher_and_robust_options_through(tmp_path, teacher_weights, monkeypatch, capsys):
    from kdcache_cli.main import main

    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "kdcache", "train", "--dataset", DATASET, "--model", "cnn", "--epochs", "1", "--batch-size", "16", "--quiet",
        "--online-teacher", "cnn", "--weights", teacher_weights, "--label-noise", "0.25", "--imbalance", "2",
        "--optimizer", "adamw", "--lr", "0.001", "--grad-clip", "5", "--out", str(out)])
    main()  # returns on success
    run = json.loads((out / "run.json").read_text())
    assert (run["online_teacher"], run["teacher_weights"], run["loss"]) == ("cnn", teacher_weights, "kd")
    assert (run["label_noise"], run["imbalance"], run["optimizer"], run["grad_clip"]) == (0.25, 2.0, "adamw", 5.0)
    assert run["train_samples"] == len(robust.long_tail_indices(data.open_source(DATASET).train.labels, 2.0, 10, 0))
