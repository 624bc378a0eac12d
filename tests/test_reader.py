"""The training reader: batched rendering, ready-made batches, subsets, and worker-safe cache opening."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests_support import precompute_config
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

import kdcache
from kdcache import data
from kdcache.augment import Recipe
from kdcache.cache.store import open_cache
from kdcache.errors import CacheMismatch
from kdcache.student.reader import TrainViews, Window, rebatch
from kdcache.views import Renderer, row

DATASET = "fake:64"


def renderer_for(recipe: str, size: int = 32) -> Renderer:
    source = data.open_source(DATASET)
    return Renderer(source.train, Recipe.parse(recipe), size, source.mean, source.std)


def cached_stream(cache_path: str, **options) -> TrainViews:
    cache = open_cache(cache_path)
    source = data.open_source(DATASET)
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    renderer = Renderer(source.train, recipe, 32, source.mean, source.std)
    return TrainViews(renderer, source.train.labels, cache.chunk_samples, 0, cache_path,
                      cache.target_arrays() + ["energy"], cache.views, **options)


def assert_same_batch(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key, value in a.items():
        assert value.dtype == b[key].dtype, key
        assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("recipe", ["rrc+flip", "rrc+flip+trivial+erase+cutmix:0.5", "flip+mixup"])
def test_batch_rendering_is_bit_identical_to_rendering_each_view(recipe):
    renderer = renderer_for(recipe, size=24)
    indices = np.array([3, 0, 63, 17, 17], dtype=np.int64)
    params = renderer.recipe.sample(7, indices, np.array([0, 1, 2, 0, 1]), 64)
    expected = torch.stack([renderer(int(i), row(params, j)) for j, i in enumerate(indices)])
    assert torch.equal(renderer.batch(indices, params), expected)


def test_batches_equal_the_default_collation_of_the_item_stream(cache_path):
    stream = cached_stream(cache_path)
    stream.set_epoch(1)
    expected = list(DataLoader(stream, batch_size=10))
    batched = cached_stream(cache_path, batch_size=10)
    batched.set_epoch(1)
    got = list(DataLoader(batched, batch_size=None))
    assert [len(b["label"]) for b in got] == [10] * 6 + [4]  # batches cross window boundaries
    for a, b in zip(got, expected, strict=True):
        assert_same_batch(a, b)


def test_batches_with_workers_equal_the_item_stream_batched_by_the_loader(cache_path):
    expected = list(DataLoader(cached_stream(cache_path), batch_size=12, num_workers=2))
    got = list(DataLoader(cached_stream(cache_path, batch_size=12), batch_size=None, num_workers=2))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_same_batch(a, b)


def test_without_rendering_the_stream_is_the_same_minus_the_inputs(cache_path):
    full = list(cached_stream(cache_path, batch_size=16))
    bare = list(cached_stream(cache_path, batch_size=16, render=False))
    assert len(full) == len(bare)
    for a, b in zip(full, bare):
        assert "input" not in b
        assert_same_batch({k: v for k, v in a.items() if k != "input"}, b)
    items = list(cached_stream(cache_path, render=False))
    assert "input" not in items[0] and len(items) == 64


def test_keep_trains_on_the_subset_and_reads_like_the_whole_split(cache_path):
    keep = np.zeros(64, dtype=bool)
    keep[[1, 2, 3, 20, 40, 41, 63]] = True
    whole = [item for item in cached_stream(cache_path) if keep[item["index"]]]
    stream = cached_stream(cache_path, keep=keep)
    subset = list(stream)
    assert len(stream) == 7
    assert [(i["index"], i["view"]) for i in subset] == [(i["index"], i["view"]) for i in whole]
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(subset, whole))
    batches = list(cached_stream(cache_path, keep=keep, batch_size=4))
    assert [len(b["index"]) for b in batches] == [4, 3]
    assert torch.cat([b["index"] for b in batches]).tolist() == [i["index"] for i in whole]


def test_a_stream_read_in_the_main_process_reads_the_same_again_in_workers(cache_path):
    stream = cached_stream(cache_path, batch_size=64)
    first = next(iter(stream))  # opens the cache in this process
    again = list(DataLoader(stream, batch_size=None, num_workers=1))
    assert len(again) == 1
    assert_same_batch(first, again[0])


def test_a_recipe_without_params_trains_from_a_cache_and_alone(tmp_path, teacher_weights):
    from kdcache.teacher.config import PrecomputeConfig
    from kdcache.teacher.precompute import precompute

    path = precompute(PrecomputeConfig(dataset=DATASET, teacher="cnn", weights=teacher_weights, out=str(tmp_path),
                                       views=1, augment="none", chunk_samples=16, progress=False)).path
    source = data.open_source(DATASET)
    renderer = renderer_for("none")
    for cache in (path, None):
        stream = TrainViews(renderer, source.train.labels, 16, 0, cache, ["logits"] if cache else [], 1 if cache else None,
                            batch_size=64)
        batch = next(iter(stream))
        assert batch["input"].shape == (64, 3, 32, 32)
        assert torch.equal(batch["input"][0], renderer.plain(int(batch["index"][0])))
        assert (batch["lam"] == 1).all() and torch.equal(batch["partner_label"], batch["label"])


def test_rebatching_keeps_row_order_and_sizes():
    def window(lo: int, hi: int) -> Window:
        idx = np.arange(lo, hi)
        return Window(idx, idx * 0, {"p": idx * 2}, {"t": idx[:, None] * 3}, idx * 0 - 1, np.ones(hi - lo, np.float32))

    parts = list(rebatch(iter([window(0, 5), window(5, 6), window(6, 13)]), 4))
    assert [len(p) for p in parts] == [4, 4, 4, 1]
    assert np.concatenate([p.index for p in parts]).tolist() == list(range(13))
    assert np.concatenate([p.params["p"] for p in parts]).tolist() == [2 * i for i in range(13)]
    assert np.concatenate([p.teacher["t"] for p in parts]).shape == (13, 1)


def test_bad_reader_options_are_clear_errors():
    renderer = renderer_for("rrc")
    labels = data.open_source(DATASET).train.labels
    with pytest.raises(ValueError, match="batch_size"):
        TrainViews(renderer, labels, 16, 0, batch_size=0)
    with pytest.raises(ValueError, match="keep"):
        TrainViews(renderer, labels, 16, 0, keep=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="at least one"):
        renderer.batch([], {})


def test_default_collate_of_items_matches_collate_of_their_window(cache_path):
    stream = cached_stream(cache_path)
    window = next(stream.windows())
    assert_same_batch(stream.collate(window), default_collate(list(stream)[: len(window)]))


def test_persistent_workers_follow_set_epoch(cache_path):
    # A persistent worker copies the stream once; the epoch must still reach it every epoch.
    def order(batches) -> list[tuple[int, int]]:
        return [(i, v) for b in batches for i, v in zip(b["index"].tolist(), b["view"].tolist())]

    stream = cached_stream(cache_path, batch_size=16, render=False)
    loader = DataLoader(stream, batch_size=None, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        reference = cached_stream(cache_path, batch_size=16, render=False)
        reference.set_epoch(epoch)
        seen.append(order(loader))
        assert seen[-1] == order(reference)
    assert seen[0] != seen[1] != seen[2]


def test_a_pickled_stream_keeps_its_epoch():
    import pickle

    stream = TrainViews(renderer_for("rrc"), data.open_source(DATASET).train.labels, 16, 0)
    stream.set_epoch(5)
    clone = pickle.loads(pickle.dumps(stream))
    assert clone.epoch == 5
    clone.set_epoch(6)
    assert stream.epoch == 5


def test_prefetched_keeps_order_and_runs_on_another_thread():
    import threading

    from kdcache.runtime import prefetched

    threads = []

    def items():
        for k in range(10):
            threads.append(threading.current_thread())
            yield k

    assert list(prefetched(items(), depth=3)) == list(range(10))
    assert all(t is not threading.current_thread() for t in threads)


def test_prefetched_raises_the_producers_error_and_stops_when_closed():
    import threading

    from kdcache.runtime import prefetched

    def failing():
        yield 1
        raise KeyError("boom")

    got = prefetched(failing())
    assert next(got) == 1
    with pytest.raises(KeyError, match="boom"):
        next(got)

    produced = []

    def endless():
        k = 0
        while True:
            produced.append(k)
            yield k
            k += 1

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert not any(t.name == "kdcache-prefetch" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # it stopped, at most depth (+ the one being put) ahead


def test_the_public_loader_hands_out_decoded_teacher_batches_of_any_logit_mode(tmp_path, teacher_weights):
    sparse = kdcache.precompute(precompute_config(tmp_path, teacher_weights, logits="topk:3",
                                                  features=("layer2:attention",))).path
    loader = kdcache.loader(sparse, "fake:64", batch_size=16, energy=True, features=["layer2"])
    loader.dataset.set_epoch(1)
    batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == 64 and len(batches) == 4
    batch = batches[0]
    cache = kdcache.open_cache(sparse)
    i, v = batch["index"].numpy(), batch["view"].numpy()
    assert batch["input"].shape == (16, 3, 32, 32) and "logits" not in batch["teacher"]
    np.testing.assert_allclose(batch["teacher"]["probs"].numpy(), cache.targets(i, v), rtol=1e-6)
    np.testing.assert_array_equal(batch["teacher"]["energy"].numpy(), cache.energy(i, v))
    np.testing.assert_array_equal(batch["teacher"]["features"]["layer2"].numpy(), cache.features("layer2", i, v))
    assert not any(key.startswith("teacher/") for key in batch)
    with pytest.raises(CacheMismatch, match="was made from dataset"):
        kdcache.loader(sparse, "fake:65")
