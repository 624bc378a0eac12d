"""Stage 1: what precompute stores, that it replays exactly, and that it reuses and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from kdcache import data, models
from kdcache.augment import Recipe
from kdcache.errors import CacheMismatch, InvalidSpec, MissingData, WeightsMismatch
from kdcache.precompute import PrecomputeConfig, energy, precompute
from kdcache.store import open_cache
from kdcache.views import Renderer, TrainViews, row

DATASET = "fake:64"


def config(out, weights, **kw) -> PrecomputeConfig:
    base = dict(dataset=DATASET, teacher="cnn", weights=weights, out=str(out), views=3, batch_size=50,
                chunk_samples=16, progress=False)
    return PrecomputeConfig(**(base | kw))


def test_cache_is_a_zarr_v3_group_that_plain_zarr_reads(cache_path):
    group = zarr.open_group(cache_path, mode="r")
    assert group.metadata.zarr_format == 3
    assert group["labels"].shape == (64,)
    assert group["logits"].shape == (64, 3, 10) and group["logits"].dtype == np.float16
    assert group["energy"].shape == (64, 3, 2)
    assert group["aug/rrc"].shape[:2] == (64, 3)
    manifest = group.attrs["kdcache"]
    assert manifest["status"] == "complete" and manifest["format_version"] == 1
    assert manifest["dataset"]["fingerprint"] == data.open_source(DATASET).fingerprint
    assert manifest["teacher"]["members"][0]["sha256"].startswith("sha256:")
    np.testing.assert_array_equal(group["labels"][:], data.open_source(DATASET).train.labels)


def test_stored_energy_equals_minus_t_logsumexp_of_stored_logits(cache_path):
    cache = open_cache(cache_path)
    logits = torch.from_numpy(np.asarray(cache.group["logits"][:], dtype=np.float32)).reshape(-1, 10)
    stored = np.asarray(cache.group["energy"][:]).reshape(-1, 2)
    for col, t in enumerate(cache.manifest["outputs"]["energy"]["temperatures"]):
        expected = (-t * torch.logsumexp(logits / t, dim=1)).numpy()
        # energy is computed from float32 logits; the stored logits are float16-rounded
        np.testing.assert_allclose(stored[:, col], expected, rtol=2e-3, atol=2e-2)


def test_energy_function_matches_formula():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    e = energy(z, (1.0, 4.0))
    assert torch.allclose(e[1], torch.tensor([-np.log(3.0), -4 * np.log(3.0)], dtype=torch.float32))
    assert torch.allclose(e[0, 0], -torch.logsumexp(z[0], 0))


def test_replayed_student_input_is_bit_identical_to_teacher_input(tmp_path, teacher_weights):
    seen: list[torch.Tensor] = []
    cfg = config(tmp_path / "c", teacher_weights, batch_size=7)
    precompute(cfg, on_batch=lambda inputs, logits: seen.append(inputs.clone()))
    teacher_inputs = torch.cat(seen).reshape(64, 3, 3, 32, 32)  # sample-major: pair p = i*K + v

    cache = open_cache(cfg.out)
    source = data.open_source(DATASET)
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    renderer = Renderer(source.train, recipe, 32, source.mean, source.std)
    for i, v in [(0, 0), (5, 2), (63, 1)]:
        params = cache.aug_params(np.array([i]), np.array([v]))
        assert torch.equal(renderer(i, row(params, 0)), teacher_inputs[i, v])
    # and through the training stream itself, which reads params block-wise
    stream = TrainViews(renderer, source.train.labels, cache.chunk_samples, 0, cfg.out, ["logits"], 3)
    for item in list(stream)[:20]:
        assert torch.equal(item["input"], teacher_inputs[item["index"], item["view"]])


def test_params_and_logits_do_not_depend_on_batch_size(tmp_path, teacher_weights):
    a = open_cache(precompute(config(tmp_path / "a", teacher_weights, batch_size=7)).path)
    b = open_cache(precompute(config(tmp_path / "b", teacher_weights, batch_size=64)).path)
    assert a.id == b.id
    for name in a.array_names:
        if name.startswith("aug/"):
            assert np.asarray(a.group[name][:]).tobytes() == np.asarray(b.group[name][:]).tobytes()
    np.testing.assert_allclose(np.asarray(a.group["logits"][:], np.float32),
                               np.asarray(b.group["logits"][:], np.float32), atol=1e-2)


def test_second_precompute_reuses_the_complete_cache_without_teacher_forward(tmp_path, teacher_weights):
    cfg = config(tmp_path / "c", teacher_weights)
    first = precompute(cfg)
    calls = []
    again = precompute(cfg, on_batch=lambda *a: calls.append(1))
    assert again.reused and again.cache_id == first.cache_id and not calls and again.views_computed == 0


def test_interrupted_precompute_is_refused_for_training_and_resumes_only_missing_shards(tmp_path, teacher_weights):
    # chunks of 8 samples, shards of 4 chunks: 2 shards of 32 samples x 3 views = 96 views = 2 batches each
    cfg = config(tmp_path / "c", teacher_weights, batch_size=48, chunk_samples=8)
    batches = []

    def crash_in_third_batch(inputs, logits):
        batches.append(len(inputs))
        if len(batches) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        precompute(cfg, on_batch=crash_in_third_batch)
    partial = open_cache(cfg.out, allow_incomplete=True)
    assert partial.num_shards == 2 and not partial.complete and partial.shards_done().tolist() == [True, False]
    with pytest.raises(Exception, match="incomplete"):
        open_cache(cfg.out)
    resumed = precompute(cfg)
    assert not resumed.reused and resumed.views_computed == 64 * 3 - partial.shard_samples * 3
    full = precompute(config(tmp_path / "fresh", teacher_weights, chunk_samples=8))
    a, b = open_cache(resumed.path), open_cache(full.path)
    for name in a.array_names:
        np.testing.assert_array_equal(np.asarray(a.group[name][:]), np.asarray(b.group[name][:]))


def test_bfloat16_and_float32_logits_read_back_as_float32(tmp_path, teacher_weights):
    ref = open_cache(precompute(config(tmp_path / "f32", teacher_weights, logit_dtype="float32")).path)
    bf = open_cache(precompute(config(tmp_path / "bf16", teacher_weights, logit_dtype="bfloat16")).path)
    i, v = np.arange(10), np.arange(10) % 3
    exact = ref.logits(i, v)
    np.testing.assert_allclose(bf.logits(i, v), exact, rtol=1e-2, atol=1e-2)
    assert bf.manifest["outputs"]["logits"]["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (dict(views=0), InvalidSpec),
        (dict(views=-2), InvalidSpec),
        (dict(teacher="nosuchnet"), InvalidSpec),
        (dict(dataset="nosuchdata"), InvalidSpec),
        (dict(dataset="fake:0"), InvalidSpec),
        (dict(weights="/nonexistent/teacher.pt"), MissingData),
        (dict(dataset="fake:64:5"), WeightsMismatch),  # weights of a 10-class teacher
        (dict(logit_dtype="int8"), InvalidSpec),
        (dict(augment="rrc+bogus"), InvalidSpec),
    ],
)
def test_bad_input_is_a_clear_error_that_writes_nothing(tmp_path, teacher_weights, change, error):
    cfg = config(tmp_path / "c", change.pop("weights", teacher_weights), **change)
    with pytest.raises(error) as info:
        precompute(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "c").exists()


def test_a_different_cache_at_out_is_never_overwritten(tmp_path, teacher_weights):
    precompute(config(tmp_path / "c", teacher_weights))
    with pytest.raises(CacheMismatch, match="other inputs"):
        precompute(config(tmp_path / "c", teacher_weights, seed=1))
    assert open_cache(str(tmp_path / "c")).manifest["recipe"]["seed"] == 0


def test_teacher_given_as_module_is_identified_by_its_parameters(tmp_path):
    torch.manual_seed(1)
    net = models.create_model("cnn", 10, 3)
    a = precompute(config(tmp_path / "a", None), teacher=net)
    torch.manual_seed(2)
    other = models.create_model("cnn", 10, 3)
    b = precompute(config(tmp_path / "b", None), teacher=other)
    assert a.cache_id != b.cache_id
