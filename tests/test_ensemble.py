"""Teacher ensembles: the stored target is the combination of the members' outputs, members are kept
on request, and every member's spec and weights hash decides the cache id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests_support import precompute_config, save_cnn_teacher

from kdcache import data, models
from kdcache.augment import Recipe
from kdcache.cache.logits import decode_logits
from kdcache.cache.store import open_cache
from kdcache.errors import InvalidSpec
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.ensemble import combine
from kdcache.teacher.outputs import energy
from kdcache.teacher.precompute import precompute
from kdcache.views import Renderer

DATASET = "fake:64"


@pytest.fixture(scope="module")
def second_weights(tmp_path_factory) -> str:
    """A second, different `cnn` teacher for `fake:64`."""
    return save_cnn_teacher(tmp_path_factory.mktemp("member"), "second.pt", seed=99, scale=10)


def config(out, teachers, weights, **kw) -> PrecomputeConfig:
    return precompute_config(out, tuple(weights), **({"dataset": DATASET, "teacher": tuple(teachers), "views": 2} | kw))


def member_logits(cache, weights: list[str], i: np.ndarray, v: np.ndarray) -> list[torch.Tensor]:
    """Each member run directly on the views the cache's params replay."""
    source = data.open_source(DATASET)
    renderer = Renderer(source.train, Recipe.from_manifest(cache.manifest["recipe"]["augment"]),
                        cache.manifest["recipe"]["input_size"], source.mean, source.std)
    inputs = renderer.batch(i, cache.aug_params(i, v))
    out = []
    for path in weights:
        net = models.create_model("cnn", 10, 3)
        models.load_weights(net, path)
        with torch.inference_mode():
            out.append(net.eval()(inputs).float())
    return out


def test_mean_prob_ensemble_target_is_the_mean_of_the_members_softmax(tmp_path, teacher_weights, second_weights):
    weights = [teacher_weights, second_weights]
    result = precompute(config(tmp_path, ["cnn", "cnn"], weights, keep_members=True))
    cache = open_cache(result.path)
    i, v = np.arange(64), np.arange(64) % 2
    members = member_logits(cache, weights, i, v)
    want = torch.stack([torch.softmax(z, dim=1) for z in members]).mean(0).numpy()
    np.testing.assert_allclose(cache.targets(i, v), want, atol=2e-3)
    # energy is that of the ensemble target's logits: at T=1 the members' mean energy
    np.testing.assert_allclose(cache.energy(i, v, 1.0), torch.stack([energy(z, (1.0,))[:, 0] for z in members])
                               .mean(0).numpy(), rtol=1e-4, atol=1e-4)
    for k, z in enumerate(members):
        kept = decode_logits(cache.read_views(f"members/{k}/logits", i, v), "float16")
        np.testing.assert_allclose(kept, z.numpy(), rtol=2e-3, atol=2e-2)
    m = cache.manifest
    assert m["teacher"]["ensemble"] == "mean-prob"
    assert [x["sha256"] for x in m["teacher"]["members"]] == [models.file_sha256(w) for w in weights]
    assert m["outputs"]["members"]["arrays"] == ["members/0/logits", "members/1/logits"]


def test_mean_logit_ensemble_target_is_the_softmax_of_the_mean_logits(tmp_path, teacher_weights, second_weights):
    weights = [teacher_weights, second_weights]
    cache = open_cache(precompute(config(tmp_path, ["cnn", "cnn"], weights, ensemble="mean-logit",
                                         logits="topk:3")).path)
    i, v = np.arange(0, 64, 3), np.arange(0, 64, 3) % 2
    z = torch.stack(member_logits(cache, weights, i, v)).mean(0)
    values, indices = cache.read_views("topk/values", i, v), cache.read_views("topk/indices", i, v)
    want_values, want_indices = torch.log_softmax(z, dim=1).topk(3, dim=1)
    np.testing.assert_array_equal(indices, want_indices.numpy())
    np.testing.assert_allclose(values.astype(np.float32), want_values.numpy(), atol=1e-2)


def test_cache_id_covers_every_member_and_the_combination(tmp_path, teacher_weights, second_weights):
    one = precompute(config(tmp_path, ["cnn"], [teacher_weights], views=1))
    ids = {one.cache_id}
    for teachers, weights, kw in [
        (["cnn", "cnn"], [teacher_weights, second_weights], {}),
        (["cnn", "cnn"], [second_weights, teacher_weights], {}),
        (["cnn", "cnn"], [teacher_weights, second_weights], {"ensemble": "mean-logit"}),
        (["cnn", "cnn"], [teacher_weights, teacher_weights], {}),
    ]:
        ids.add(precompute(config(tmp_path, teachers, weights, views=1, **kw)).cache_id)
    assert len(ids) == 5
    # a single teacher given as a one-element list is the plain single-teacher cache
    assert precompute(config(tmp_path, ["cnn"], [teacher_weights], views=1)).reused
    assert one.manifest["teacher"]["ensemble"] is None


def test_teacher_modules_can_form_an_ensemble_from_python(tmp_path):
    torch.manual_seed(0)
    nets = [models.create_model("cnn", 10, 3) for _ in range(2)]
    cfg = PrecomputeConfig(dataset=DATASET, teacher=("cnn", "cnn"), out=str(tmp_path), views=1, batch_size=64,
                           progress=False)
    cache = open_cache(precompute(cfg, teacher=nets).path)
    assert len(cache.manifest["teacher"]["members"]) == 2


@pytest.mark.parametrize(("teachers", "weights", "kw", "match"), [
    (["cnn", "cnn"], ["a.pt"], {}, "2 --teacher but 1 --weights"),
    (["cnn"], ["a.pt"], {"keep_members": True}, "--keep-members needs an ensemble"),
    (["cnn", "cnn"], ["a.pt", "b.pt"], {"ensemble": "median"}, "--ensemble 'median'"),
])
def test_bad_ensemble_options_are_one_line_errors_that_write_nothing(tmp_path, teacher_weights, teachers, weights,
                                                                     kw, match):
    weights = [teacher_weights if w == "a.pt" else w for w in weights]
    weights = [teacher_weights] * len(weights) if len(weights) == len(teachers) else weights
    with pytest.raises(InvalidSpec, match=match):
        precompute(config(tmp_path / "out", teachers, weights, **kw))
    assert not (tmp_path / "out").exists()


def test_combine_of_one_member_is_its_logits_and_mean_prob_softmax_is_the_mean_probability():
    z = torch.randn(2, 5, 7) * 4
    assert torch.equal(combine([z[0]], "mean-prob"), z[0])
    p = torch.softmax(combine(list(z), "mean-prob"), dim=1)
    torch.testing.assert_close(p, torch.softmax(z, dim=2).mean(0))
