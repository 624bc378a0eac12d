"""Stage 1: what precompute stores, that it replays exactly, and that it reuses and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from tests_support import precompute_config

from kdcache import data, models
from kdcache.augment import Recipe
from kdcache.cache.formats import FORMAT_VERSION
from kdcache.cache.logits import densify
from kdcache.cache.store import open_cache
from kdcache.errors import CacheCorrupt, CacheMismatch, InvalidSpec, MissingData, WeightsMismatch
from kdcache.runtime import codec_threads, loader_workers
from kdcache.student.reader import TrainViews
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.outputs import FeatureCapture, class_uniforms, energy, sample_counts
from kdcache.teacher.passes import Shard, ShardWriter
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer, row

DATASET = "fake:64"


def config(out, weights, **kw) -> PrecomputeConfig:
    return precompute_config(out, weights, **({"dataset": DATASET} | kw))


def test_cache_is_a_zarr_v3_group_that_plain_zarr_reads(cache_path):
    group = zarr.open_group(cache_path, mode="r")
    assert group.metadata.zarr_format == 3
    assert group["labels"].shape == (64,)
    assert group["logits"].shape == (64, 3, 10) and group["logits"].dtype == np.float16
    assert group["energy"].shape == (64, 3, 2)
    assert group["aug/rrc"].shape[:2] == (64, 3)
    manifest = group.attrs["kdcache"]
    assert manifest["status"] == "complete" and manifest["format_version"] == FORMAT_VERSION
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
    result = precompute(cfg, on_batch=lambda inputs, logits: seen.append(inputs.clone()))
    teacher_inputs = torch.cat(seen).reshape(64, 3, 3, 32, 32)  # sample-major: pair p = i*K + v

    cache = open_cache(result.path)
    source = data.open_source(DATASET)
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    renderer = Renderer(source.train, recipe, 32, source.mean, source.std)
    for i, v in [(0, 0), (5, 2), (63, 1)]:
        params = cache.aug_params(np.array([i]), np.array([v]))
        assert torch.equal(renderer(i, row(params, 0)), teacher_inputs[i, v])
    # and through the training stream itself, which reads params block-wise
    stream = TrainViews(renderer, source.train.labels, cache.chunk_samples, 0, result.path, ["logits"], 3)
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
    (path,) = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    partial = open_cache(str(path), allow_incomplete=True)
    assert partial.num_shards == 2 and not partial.complete and partial.shards_done().tolist() == [True, False]
    with pytest.raises(CacheCorrupt, match="incomplete"):
        open_cache(str(path))
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


def test_other_inputs_under_the_same_root_make_a_second_cache_beside_the_first(tmp_path, teacher_weights):
    first = precompute(config(tmp_path / "c", teacher_weights))
    second = precompute(config(tmp_path / "c", teacher_weights, seed=1))
    assert first.cache_id != second.cache_id and not second.reused
    assert open_cache(first.path).manifest["recipe"]["seed"] == 0
    assert open_cache(second.path).manifest["recipe"]["seed"] == 1


def test_out_naming_a_cache_instead_of_a_root_is_refused(tmp_path, teacher_weights):
    first = precompute(config(tmp_path / "c", teacher_weights))
    with pytest.raises(InvalidSpec, match="is itself a cache"):
        precompute(config(first.path, teacher_weights, seed=1))


def test_teacher_given_as_module_is_identified_by_its_parameters(tmp_path):
    torch.manual_seed(1)
    net = models.create_model("cnn", 10, 3)
    a = precompute(config(tmp_path / "a", None), teacher=net)
    torch.manual_seed(2)
    other = models.create_model("cnn", 10, 3)
    b = precompute(config(tmp_path / "b", None), teacher=other)
    assert a.cache_id != b.cache_id


# ---- logit modes ------------------------------------------------------------------------------
def teacher_outputs(cfg: PrecomputeConfig) -> tuple[str, torch.Tensor]:
    """Run precompute and return the cache path and the float32 teacher logits [N, K, C] it saw."""
    seen: list[torch.Tensor] = []
    result = precompute(cfg, on_batch=lambda inputs, logits: seen.append(logits.clone()))
    return result.path, torch.cat(seen).reshape(64, cfg.views, -1)


def test_dense_targets_equal_the_teacher_softmax_within_float16(tmp_path, teacher_weights):
    path, logits = teacher_outputs(config(tmp_path / "r", teacher_weights))
    cache = open_cache(path)
    i, v = np.repeat(np.arange(64), 3), np.tile(np.arange(3), 64)
    for t in (1.0, 4.0):
        expected = torch.softmax(logits[i, v] / t, dim=1).numpy()
        np.testing.assert_allclose(cache.targets(i, v, t), expected, atol=2e-3)
    np.testing.assert_allclose(cache.logits(i, v), logits[i, v].numpy(), rtol=1e-3, atol=1e-2)


def test_topk_targets_hold_exact_topk_probabilities_and_a_uniform_remainder(tmp_path, teacher_weights):
    path, logits = teacher_outputs(config(tmp_path / "r", teacher_weights, logits="topk:3"))
    cache = open_cache(path)
    assert cache.target_arrays() == ["topk/values", "topk/indices"] and not cache.dense_logits
    assert cache.group["topk/indices"].dtype == np.int16 and cache.group["topk/values"].dtype == np.float16
    i, v = np.repeat(np.arange(64), 3), np.tile(np.arange(3), 64)
    p = torch.softmax(logits[i, v], dim=1)
    top, idx = p.topk(3, dim=1)
    got = torch.from_numpy(cache.targets(i, v))
    np.testing.assert_allclose(got.gather(1, idx), top, rtol=2e-3, atol=1e-4)
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(1, idx, False)
    expected_rest = ((1 - top.sum(1)) / 7)[:, None].expand(-1, 10)[rest].reshape(-1, 7)
    np.testing.assert_allclose(got[rest].reshape(-1, 7), expected_rest, atol=2e-3)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
    # energy comes from the full float32 logits, not from the three stored classes
    stored = cache.energy(i, v)
    np.testing.assert_allclose(stored[:, 0], (-torch.logsumexp(logits[i, v], dim=1)).numpy(), rtol=1e-5)
    with pytest.raises(CacheMismatch, match="topk logits, not dense"):
        cache.logits(i, v)


def test_sampled_counts_are_an_unbiased_estimate_of_the_teacher_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0]])
    rows, draws = 4000, 50
    u = torch.from_numpy(class_uniforms(7, np.arange(rows), np.zeros(rows, np.int64), draws))
    ids, counts = sample_counts(logits.expand(rows, -1), u, width=draws)
    assert (counts.sum(1) == draws).all() and ((ids >= 0) == (counts > 0)).all()
    estimate = densify({"mode": "sampled", "draws": draws}, 7, {"sampled/ids": ids.numpy(),
                                                                   "sampled/counts": counts.numpy()})
    p = torch.softmax(logits, dim=1)[0].numpy()
    sigma = np.sqrt(p * (1 - p) / (rows * draws))
    assert np.all(np.abs(estimate.mean(0) - p) < 5 * sigma + 1e-9)
    # each row is sparse: about as many distinct ids as the distribution's effective support
    assert 3 < (ids >= 0).sum(1).float().mean() < 7


def test_sampled_cache_is_ids_and_counts_that_do_not_depend_on_batch_size(tmp_path, teacher_weights):
    a = open_cache(precompute(config(tmp_path / "a", teacher_weights, logits="sampled:50", batch_size=7)).path)
    b = open_cache(precompute(config(tmp_path / "b", teacher_weights, logits="sampled:50", batch_size=64)).path)
    assert a.target_arrays() == ["sampled/ids", "sampled/counts"]
    ids, counts = a.read_samples("sampled/ids", 0, 64), a.read_samples("sampled/counts", 0, 64)
    assert ids.shape == (64, 3, 10) and ids.dtype == np.int16 and counts.dtype == np.uint8
    assert (counts.sum(-1) == 50).all() and ((ids >= 0) == (counts > 0)).all()
    np.testing.assert_array_equal(ids, b.read_samples("sampled/ids", 0, 64))
    np.testing.assert_array_equal(counts, b.read_samples("sampled/counts", 0, 64))
    i, v = np.arange(64), np.arange(64) % 3
    np.testing.assert_allclose(a.targets(i, v).sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("logits", ["bogus", "topk", "topk:0", "topk:11", "sampled:x", "sampled:70000", "dense:3"])
def test_bad_logit_mode_is_a_clear_error_that_writes_nothing(tmp_path, teacher_weights, logits):
    with pytest.raises(InvalidSpec, match="--logits") as info:
        precompute(config(tmp_path / "c", teacher_weights, logits=logits))
    assert "\n" not in str(info.value) and not (tmp_path / "c").exists()


# ---- feature maps -----------------------------------------------------------------------------
def test_feature_modes_store_what_a_direct_forward_hook_sees(tmp_path, teacher_weights):
    # layer1.0 is a conv whose output the next ReLU overwrites in place: the cache must keep a copy
    features = ("layer1.0:full", "layer1:attention", "layer2:pooled")
    result = precompute(config(tmp_path / "r", teacher_weights, features=features))
    cache = open_cache(result.path)
    layers = cache.feature_layers()
    assert {k: (v["mode"], v["shape"]) for k, v in layers.items()} == {
        "layer1.0": ("full", [16, 32, 32]), "layer1": ("attention", [16, 16]), "layer2": ("pooled", [32])}
    assert cache.group["features/layer1"].shape == (64, 3, 16, 16)
    # full maps take plain zstd, measured smaller and faster to encode for them; the rest blosc-zstd
    codecs = {name: type(cache.group[name].compressors[0]).__name__ for name in cache.array_names}
    assert codecs.pop("features/layer1.0") == "ZstdCodec" and set(codecs.values()) == {"BloscCodec"}
    assert cache.group["features/layer1.0"].compressors[0].level == 1

    teacher = models.create_model("cnn", 10, 3)
    models.load_weights(teacher, teacher_weights, spec="cnn")
    teacher.eval()
    seen: dict[str, torch.Tensor] = {}
    modules = dict(teacher.named_modules())
    for name in ("layer1.0", "layer1", "layer2"):
        modules[name].register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.clone()))
    source = data.open_source(DATASET)
    renderer = Renderer(source.train, Recipe.from_manifest(cache.manifest["recipe"]["augment"]), 32,
                        source.mean, source.std)
    i, v = np.array([0, 17, 63]), np.array([0, 2, 1])
    params = cache.aug_params(i, v)
    with torch.inference_mode():
        teacher(torch.stack([renderer(int(k), row(params, j)) for j, k in enumerate(i)]))
    a = seen["layer1"].pow(2).sum(1)
    expected = {
        "layer1.0": seen["layer1.0"],
        "layer1": a / (a.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-6),
        "layer2": seen["layer2"].mean(dim=(2, 3)),
    }
    for layer, want in expected.items():
        np.testing.assert_allclose(cache.features(layer, i, v), want.numpy(), rtol=2e-3, atol=2e-3)
    assert not seen["layer1.0"].ge(0).all(), "the conv output must hold negatives (taken before the ReLU)"


@pytest.mark.parametrize(("features", "match"), [
    (("nosuchlayer",), "has no layer 'nosuchlayer'.*layer1"),
    (("fc:attention",), "attention needs a \\[C,H,W\\] map"),
    (("layer1:bogus",), "is not LAYER"),
    (("layer1", "layer1:full"), "twice"),
])
def test_bad_feature_spec_is_a_clear_error_that_writes_nothing(tmp_path, teacher_weights, features, match):
    with pytest.raises(InvalidSpec, match=match) as info:
        precompute(config(tmp_path / "c", teacher_weights, features=features))
    assert "\n" not in str(info.value) and not (tmp_path / "c").exists()


def test_loader_workers_default_to_spare_cores_beside_cuda_only(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert loader_workers(None, torch.device("cuda")) == 4
    assert loader_workers(None, torch.device("cpu")) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(None, torch.device("cuda")) == 1
    assert loader_workers(3, torch.device("cpu")) == 3
    with pytest.raises(InvalidSpec, match="--workers"):
        loader_workers(-1, torch.device("cuda"))


def test_codec_threads_leave_the_models_cores_free_on_cpu_only(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert codec_threads(torch.device("cpu")) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert codec_threads(torch.device("cpu")) == 1
    assert codec_threads(torch.device("cuda")) is None


def test_precompute_on_cpu_limits_zarrs_codec_threads_unless_the_user_did(tmp_path, teacher_weights):
    with zarr.config.set({"threading.max_workers": None}):
        precompute(config(tmp_path / "a", teacher_weights, device="cpu"))
        assert zarr.config.get("threading.max_workers") == codec_threads(torch.device("cpu"))
    with zarr.config.set({"threading.max_workers": 5}):
        precompute(config(tmp_path / "b", teacher_weights, device="cpu"))
        assert zarr.config.get("threading.max_workers") == 5


def test_shard_writer_hands_a_written_shards_buffers_out_again():
    written: list[tuple[int, np.ndarray]] = []
    writer = ShardWriter(lambda shard, arrays: written.append((shard.key, arrays["energy"].copy())))
    views = np.arange(3)
    full, short = Shard(0, 0, np.arange(64), views), Shard(1, 64, np.arange(64, 80), views)
    like = {"energy": np.zeros((5, 2), np.float32)}
    try:
        first = writer.buffers(full, like)
        assert first["energy"].shape == (64, 3, 2) and first["energy"].dtype == np.float32
        first["energy"][...] = 1.0
        writer.submit(full, first)
        writer.wait()
        assert writer.buffers(short, like)["energy"].shape == (16, 3, 2)  # a shorter shard gets its own
        writer.submit(full, first)
        writer.wait()
        assert writer.buffers(full, like) is first
    finally:
        writer.close()
    assert [key for key, _ in written] == [0, 0] and (written[0][1] == 1.0).all()


def test_shards_that_reuse_buffers_store_every_views_own_outputs(tmp_path, teacher_weights):
    """Shards 0-2 of 64 samples and a last one of 8, batches of 7 across shard ends: shard 2 is
    filled in shard 0's recycled buffers, and must not keep any of shard 0's values."""
    seen: list[torch.Tensor] = []
    cfg = config(tmp_path / "c", teacher_weights, dataset="fake:200", views=2, batch_size=7)
    cache = open_cache(precompute(cfg, on_batch=lambda inputs, logits: seen.append(logits.clone())).path)
    assert cache.num_shards == 4
    logits = torch.cat(seen).reshape(200, 2, -1)
    i, v = np.repeat(np.arange(200), 2), np.tile(np.arange(2), 200)
    np.testing.assert_allclose(cache.logits(i, v), logits[i, v].numpy(), rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(cache.read_samples("energy", 0, 200).reshape(400, -1),
                               energy(logits[i, v], (1.0, 4.0)).numpy(), rtol=1e-5)


def test_feature_capture_reuses_full_maps_memory_only_when_given_back(teacher_weights):
    teacher = models.create_model("cnn", 10, 3)
    models.load_weights(teacher, teacher_weights, spec="cnn")
    tap = FeatureCapture(teacher.eval(), {"layer1": "full", "layer2": "pooled"})
    a, b = torch.rand(5, 3, 32, 32), torch.rand(5, 3, 32, 32)
    try:
        with torch.inference_mode():
            teacher(a)
            first = tap.take()
            kept = first["layer1"].clone()
            teacher(b)
            second = tap.take()  # nothing given back: the first maps stay as they were
            assert second["layer1"].data_ptr() != first["layer1"].data_ptr()
            assert torch.equal(first["layer1"], kept)
            tap.give_back()
            teacher(a)
            third = tap.take()
    finally:
        tap.close()
    assert third["layer1"].data_ptr() == second["layer1"].data_ptr()
    assert torch.equal(third["layer1"], kept)  # the given-back memory now holds this pass's maps


def test_bf16_teacher_precision_is_recorded_changes_the_id_and_agrees_with_fp32(tmp_path, teacher_weights):
    from tests_support import precompute_config

    from kdcache.audit import recompute

    fp32 = precompute(precompute_config(tmp_path / "a", teacher_weights, precision="fp32", features=("layer1",)))
    bf16 = precompute(precompute_config(tmp_path / "b", teacher_weights, precision="bf16", features=("layer1",)))
    assert (fp32.manifest["outputs"]["precision"], bf16.manifest["outputs"]["precision"]) == ("fp32", "bf16")
    assert fp32.cache_id != bf16.cache_id
    a, b = open_cache(fp32.path), open_cache(bf16.path)
    za, zb = a.read_samples("logits", 0, 64).astype(np.float32), b.read_samples("logits", 0, 64).astype(np.float32)
    scale = np.abs(za).max()
    assert np.abs(za - zb).max() <= 0.02 * scale and not np.array_equal(za, zb)  # bf16 keeps 8 mantissa bits
    ea, eb = a.read_samples("energy", 0, 64), b.read_samples("energy", 0, 64)
    assert np.abs(ea - eb).max() <= 0.02 * np.abs(ea).max()
    auto = precompute(precompute_config(tmp_path / "a", teacher_weights, precision="auto", features=("layer1",)))
    assert auto.reused and auto.cache_id == fp32.cache_id  # auto is fp32 on a CPU
    report = recompute(bf16.path, 8, device="cpu")  # the recompute runs the teacher at the recorded precision
    assert report.pairs == 8 and not report.problems
