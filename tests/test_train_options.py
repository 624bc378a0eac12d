"""Training options of the reinforced-dataset recipes and the GPU: an EMA of the weights, label smoothing, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdcache import losses, models
from kdcache.losses.base import cross_entropy
from kdcache.student.config import TrainConfig
from kdcache.student.ema import EMA
from kdcache.student.train import train


def test_ema_weights_equal_the_hand_computed_average_over_three_steps():
    torch.manual_seed(0)
    model = models.create_model("cnn", 10, 3)
    p0 = [p.detach().clone() for p in model.parameters()]
    ema, d = EMA(model, 0.9), 0.9
    steps = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        steps.append([p.detach().clone() for p in model.parameters()])
        ema.update(model)
    for k, got in enumerate(ema.module.parameters()):
        expected = d**3 * p0[k] + d**2 * (1 - d) * steps[0][k] + d * (1 - d) * steps[1][k] + (1 - d) * steps[2][k]
        assert torch.allclose(got, expected, atol=1e-6)


def test_label_smoothing_changes_the_ce_term_as_its_formula_says():
    torch.manual_seed(1)
    logits, labels, eps = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 0.1
    log_p = F.log_softmax(logits, dim=1)
    expected = ((1 - eps) * -log_p[torch.arange(6), labels] + eps * -log_p.mean(dim=1)).mean()
    got = cross_entropy(logits, losses.Batch(labels=labels, label_smoothing=eps))
    assert torch.allclose(got, expected, atol=1e-6)
    soft = F.one_hot(labels, 5).float() * 0.7 + F.one_hot((labels + 1) % 5, 5).float() * 0.3
    mixed = cross_entropy(logits, losses.Batch(labels=labels, soft_labels=soft, label_smoothing=eps))
    target = (1 - eps) * soft + eps / 5
    assert torch.allclose(mixed, -(target * log_p).sum(1).mean(), atol=1e-6)
    assert not torch.allclose(got, cross_entropy(logits, losses.Batch(labels=labels)))


def test_train_with_ema_evaluates_and_saves_the_average_and_resumes_it(tmp_path, cache_path):
    cfg = TrainConfig(dataset="fake:64", model="cnn", cache=cache_path, out=str(tmp_path / "run"), epochs=2,
                      batch_size=16, ema=0.5, label_smoothing=0.1, progress=False, device="cpu")
    result = train(cfg)
    final = result.final
    assert {"ema_test_top1", "ema_test_top5", "ema_test_ece", "ema_test_loss"} <= set(final)
    raw = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    averaged = torch.load(tmp_path / "run" / "model_ema.pt", weights_only=True)
    assert raw.keys() == averaged.keys() and any(not torch.equal(raw[k], averaged[k]) for k in raw)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["ema"], run["label_smoothing"]) == (0.5, 0.1)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["ema"][k], averaged[k]) for k in averaged)


@pytest.mark.parametrize(("option", "value"), [("ema", 1.0), ("ema", 0.0), ("label_smoothing", 1.0)])
def test_bad_ema_and_label_smoothing_are_refused(tmp_path, option, value):
    from kdcache.errors import InvalidSpec

    cfg = TrainConfig(dataset="fake:64", model="cnn", out=str(tmp_path / "r"), **{option: value})
    with pytest.raises(InvalidSpec):
        cfg.validate()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_student_precision_runs_under_autocast_and_is_recorded(tmp_path, cache_path, precision):
    cfg = TrainConfig(dataset="fake:64", model="cnn", cache=cache_path, out=str(tmp_path / "run"), epochs=1,
                      batch_size=16, precision=precision, progress=False, device="cpu")
    result = train(cfg)
    assert result.final["loss"] == result.final["loss"]  # finite
    assert json.loads((tmp_path / "run" / "run.json").read_text())["precision"] == precision
    off = TrainConfig(**(vars(cfg) | {"out": str(tmp_path / "off"), "amp": False}))
    train(off)
    assert json.loads((tmp_path / "off" / "run.json").read_text())["precision"] == "fp32"


def test_evaluation_sums_of_rank_shares_give_the_whole_split_metrics():
    import torch.nn.functional as F

    from kdcache.student.evaluate import eval_metrics, eval_sums, expected_calibration_error

    torch.manual_seed(2)
    logits, labels = torch.randn(50, 7) * 3, torch.randint(0, 7, (50,))
    whole = eval_metrics(eval_sums(logits, labels).tolist())
    probs = logits.softmax(1)
    assert whole["top1"] == pytest.approx(100.0 * float((probs.argmax(1) == labels).float().mean()))
    assert whole["ece"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-6)
    assert whole["loss"] == pytest.approx(float(F.nll_loss(probs.log(), labels)), rel=1e-5)
    shares = sum(eval_sums(logits[r::3], labels[r::3]) for r in range(3))  # three ranks' shares, all-reduced
    assert eval_metrics(shares.tolist()) == pytest.approx(whole)


def test_each_rank_evaluates_its_own_share_of_the_test_split():
    from kdcache import data
    from kdcache.student.evaluate import eval_loader

    source = data.open_source("fake:64")
    shares = [eval_loader(source, "test", 32, 8, rank=r, world=3).dataset.indices for r in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(source.test)))


@pytest.mark.slow  # torch.compile builds its kernels with the C compiler
def test_compiled_teacher_and_student_run_and_the_teacher_gives_the_same_cache(tmp_path, teacher_weights):
    import numpy as np
    from tests_support import precompute_config

    from kdcache.cache.store import open_cache
    from kdcache.teacher.precompute import precompute

    plain = precompute(precompute_config(tmp_path / "a", teacher_weights, features=("layer1",)))
    compiled = precompute(precompute_config(tmp_path / "b", teacher_weights, features=("layer1",), compile=True))
    assert compiled.cache_id == plain.cache_id  # compiling changes no output: not part of the id
    a, b = open_cache(plain.path), open_cache(compiled.path)
    for name in ("logits", "energy", "features/layer1"):
        x, y = a.read_samples(name, 0, 64).astype(np.float32), b.read_samples(name, 0, 64).astype(np.float32)
        assert np.allclose(x, y, rtol=1e-2, atol=1e-2), name
    result = train(TrainConfig(dataset="fake:64", model="cnn", cache=plain.path, out=str(tmp_path / "run"), epochs=1,
                               batch_size=16, compile=True, progress=False, device="cpu"))
    assert result.final["loss"] == result.final["loss"]


def test_running_sums_stay_on_the_device_and_name_the_steps_a_non_finite_loss_hid_in():
    from tqdm import tqdm

    from kdcache.errors import TrainingDiverged
    from kdcache.student.epoch import RunningSums

    sums, bar = RunningSums(torch.device("cpu"), every=3), tqdm(disable=True)
    labels = torch.tensor([0, 1])
    for value in (1.0, 2.0, 3.0):
        sums.add(2, torch.tensor(value), {"ce": torch.tensor(value / 2)}, labels, labels, None)
        sums.check(0, Path("nowhere"), bar)
    names, values = sums.totals()
    assert names == ["loss", "ce"] and values == [6, 6.0, 0.0, 12.0, 6.0]
    sums.add(2, torch.tensor(float("nan")), {"ce": torch.tensor(0.0)}, labels, labels, None)
    sums.check(0, Path("nowhere"), bar)  # not yet: read every 3 steps
    with pytest.raises(TrainingDiverged, match="epoch 1, step 4 — lower --lr"):
        sums.check(0, Path("nowhere"), bar, force=True)


@pytest.mark.parametrize("mode", ["dense:float16", "dense:bfloat16", "topk:3", "sampled:20"])
def test_cached_targets_decoded_on_the_device_equal_the_numpy_decoding(tmp_path, teacher_weights, mode):
    import numpy as np
    from tests_support import precompute_config

    from kdcache.cache.store import open_cache
    from kdcache.student.targets import CacheTargets
    from kdcache.teacher.precompute import precompute

    logits, _, dtype = mode.partition(":") if mode.startswith("dense") else (mode, "", "float16")
    cache = open_cache(precompute(precompute_config(tmp_path, teacher_weights, logits=logits,
                                                    logit_dtype=dtype or "float16")).path)
    targets = CacheTargets(cache, energy=True)
    stored = cache.read_block(targets.arrays(), 0, 16, 1)
    batch = {f"teacher/{name}": torch.from_numpy(np.ascontiguousarray(v)) for name, v in stored.items()}
    on_device = targets(batch, torch.device("cpu"))  # the trainer's path: decode where the loss runs
    reference = targets.decode(batch)  # the loader's numpy path (kdcache.loader)
    got = on_device.logits if on_device.logits is not None else on_device.probs
    want = reference["logits"] if "logits" in reference else reference["probs"]
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    assert torch.equal(on_device.energy, reference["energy"][:, targets.energy_column])
