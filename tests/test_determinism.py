"""Determinism across topology: one seed gives one cache, whatever the batch size, the number of
DataLoader workers or where an interrupted precompute resumed; training replays exactly its views."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdcache import data
from kdcache.augment import Recipe
from kdcache.cache.store import open_cache
from kdcache.student.reader import TrainViews
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer, row

DATASET = "fake:32"
N = 32
VIEWS = 3
CHUNK = 2  # 16 chunks of 2 samples, shards of 4 chunks: 4 shards of 8 samples x 3 views
STRONG = "rrc+flip+trivial+erase+cutmix:0.5"  # every op kind, and half of the views render a partner
MIXUP = "rrc+flip+trivial+mixup:0.2:0.5"  # lambdas from the Beta sampler


def config(out, weights, augment: str, **kw) -> PrecomputeConfig:
    base = {
        "dataset": DATASET,
        "teacher": "cnn",
        "weights": weights,
        "out": str(out),
        "views": VIEWS,
        "seed": 3,
        "augment": augment,
        "batch_size": 50,
        "chunk_samples": CHUNK,
        "workers": 0,
        "progress": False,
    }
    return PrecomputeConfig(**(base | kw))


def interrupt_at(batch: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """An ``on_batch`` callback that interrupts precompute at its ``batch``-th teacher batch."""
    seen = []

    def crash(inputs: torch.Tensor, logits: torch.Tensor) -> None:
        seen.append(len(inputs))
        if len(seen) == batch:
            raise KeyboardInterrupt

    return crash


def interrupted_then_resumed(cfg: PrecomputeConfig, stops: list[int]) -> str:
    """Run ``cfg``, interrupting it at its ``stops[0]``-th teacher batch, rerun it interrupted at
    ``stops[1]``, … then let it finish; return where the finished cache is. Checks that the last
    run only computed the shards the interrupted runs had not finished."""
    for stop in stops:
        with pytest.raises(KeyboardInterrupt):
            precompute(cfg, on_batch=interrupt_at(stop))
    result = precompute(cfg)
    shard_views = open_cache(result.path).shard_samples * VIEWS
    batches_per_shard = -(-shard_views // cfg.batch_size)
    done = sum((stop - 1) // batches_per_shard for stop in stops)  # shards each interrupted run finished
    assert not result.reused and result.views_computed == N * VIEWS - done * shard_views
    return result.path


def assert_same_cache(path_a: str, path_b: str) -> None:
    """Every array of two caches: params and labels byte-identical, float16 logits equal within one
    float16 rounding step, float32 outputs within float32 rounding."""
    a, b = open_cache(path_a), open_cache(path_b)
    assert a.id == b.id and a.array_names == b.array_names
    for name in ["labels", *a.array_names]:
        x, y = np.asarray(a.group[name][:]), np.asarray(b.group[name][:])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype == np.float16:
            step = np.spacing(np.maximum(np.abs(x), np.abs(y))).astype(np.float32)
            assert (np.abs(x.astype(np.float32) - y.astype(np.float32)) <= step).all(), name
        elif x.dtype.kind == "f" and not name.startswith("aug/"):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            assert x.tobytes() == y.tobytes(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_weights) -> Callable[[str], str]:
    """``reference(augment)``: path of the cache of that recipe made in one go (batch 50, no workers)."""
    made: dict[str, str] = {}

    def get(augment: str) -> str:
        if augment not in made:
            out = tmp_path_factory.mktemp("reference") / "c"
            made[augment] = precompute(config(out, teacher_weights, augment)).path
        return made[augment]

    return get


@pytest.mark.parametrize("augment", [STRONG, MIXUP])
def test_stored_params_are_the_pure_samples_of_every_sample_and_view(reference, augment):
    cache = open_cache(reference(augment))
    assert cache.num_shards == 4
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    pairs = np.arange(N * VIEWS)
    fresh = recipe.sample(3, pairs // VIEWS, pairs % VIEWS, N)
    assert set(fresh) == {name.removeprefix("aug/") for name in cache.array_names if name.startswith("aug/")}
    for field, values in fresh.items():
        stored = np.asarray(cache.group[f"aug/{field}"][:])
        assert stored.tobytes() == values.reshape(stored.shape).tobytes(), field
    partner, _ = recipe.mixing(fresh)
    assert 0 < (partner >= 0).sum() < len(partner)  # some views render a partner, some do not


@pytest.mark.parametrize(("augment", "batch_size", "workers"), [(STRONG, 7, 0), (STRONG, 64, 2), (MIXUP, 5, 2)])
def test_cache_is_the_same_whatever_the_batch_size_and_workers(
    tmp_path, teacher_weights, reference, augment, batch_size, workers
):
    cfg = config(tmp_path / "c", teacher_weights, augment, batch_size=batch_size, workers=workers)
    assert_same_cache(precompute(cfg).path, reference(augment))


# batches of 20 views: shard s is batches 2s+1 (20 views) and 2s+2 (4 views), 8 batches in all
@pytest.mark.parametrize(
    ("augment", "stops"),
    [
        (STRONG, [1]),  # before any shard is written
        (STRONG, [3]),  # in the second shard, after the first was written
        (STRONG, [8]),  # at the very last batch
        (STRONG, [2, 4, 1]),  # interrupted three times, each rerun resuming where the last stopped
        (MIXUP, [2, 4, 1]),
    ],
)
def test_cache_is_the_same_whatever_the_resume_point(tmp_path, teacher_weights, reference, augment, stops):
    cfg = config(tmp_path / "c", teacher_weights, augment, batch_size=20)
    assert_same_cache(interrupted_then_resumed(cfg, stops), reference(augment))


def test_resume_with_other_batch_size_and_workers_gives_the_same_cache(tmp_path, teacher_weights, reference):
    first = config(tmp_path / "c", teacher_weights, STRONG, batch_size=13, workers=2)
    with pytest.raises(KeyboardInterrupt):  # batches of 13 and 11 views: shard 0 is written, shard 1 is not
        precompute(first, on_batch=interrupt_at(3))
    resumed = precompute(config(tmp_path / "c", teacher_weights, STRONG, batch_size=40, workers=0))
    assert 0 < resumed.views_computed < N * VIEWS
    assert_same_cache(resumed.path, reference(STRONG))


def _stream_items(stream: TrainViews, workers: int) -> list[dict]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return list(loader)


@pytest.mark.parametrize(("augment", "workers"), [(STRONG, 0), (STRONG, 2), (MIXUP, 2)])
def test_training_stream_replays_the_cached_views_with_any_worker_count(reference, augment, workers):
    path = reference(augment)
    cache = open_cache(path)
    source = data.open_source(DATASET)
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    renderer = Renderer(source.train, recipe, cache.manifest["recipe"]["input_size"], source.mean, source.std)
    stream = TrainViews(
        renderer, source.train.labels, cache.chunk_samples, 3, cache_path=path, teacher_arrays=["logits"], views=VIEWS
    )
    stored = {field: np.asarray(cache.group[f"aug/{field}"][:]) for field in recipe.fields()}
    logits = np.asarray(cache.group["logits"][:])
    views_read = set()
    for epoch in range(2):
        stream.set_epoch(epoch)
        items = _stream_items(stream, workers)
        assert sorted(item["index"] for item in items) == list(range(N))  # each sample once per epoch
        for item in items:
            i, v = item["index"], item["view"]
            params = {field: values[i, v] for field, values in stored.items()}
            assert torch.equal(item["input"], renderer(i, params)), (i, v)
            assert torch.equal(item["teacher/logits"], torch.from_numpy(logits[i, v])), (i, v)
            partner, lam = recipe.mixing({field: values[None] for field, values in params.items()})
            assert item["lam"] == float(lam[0])
            assert item["partner_label"] == int(source.train.labels[partner[0] if partner[0] >= 0 else i])
            views_read.add(v)
    assert len(views_read) > 1  # the two epochs did not both read view 0


@pytest.mark.parametrize("workers", [0, 2])
def test_training_without_a_cache_draws_the_same_fresh_views_with_any_worker_count(workers):
    source = data.open_source(DATASET)
    recipe = Recipe.parse(STRONG)
    renderer = Renderer(source.train, recipe, 32, source.mean, source.std)
    stream = TrainViews(renderer, source.train.labels, 8, 5)
    stream.set_epoch(2)
    items = _stream_items(stream, workers)
    assert sorted(item["index"] for item in items) == list(range(N))
    for item in items:
        i, v = item["index"], item["view"]
        params = recipe.sample(5, np.array([i]), np.array([v]), N)
        assert v == 2 and torch.equal(item["input"], renderer(i, row(params, 0)))
