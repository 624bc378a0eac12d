"""The cache as a stored object: format refusal, aliases, URLs, sharding, densified targets, the Python API."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tests_support import precompute_config

from kdcache.cache import logits as stored_logits
from kdcache.cache import writing
from kdcache.cache.formats import FORMAT_VERSION
from kdcache.cache.logits import densify
from kdcache.cache.store import open_cache
from kdcache.errors import CacheCorrupt, MissingData, UnsupportedFormat
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

DATASET = "fake:64"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def config(out, weights, **kw) -> PrecomputeConfig:
    return precompute_config(out, weights, **({"dataset": DATASET, "batch_size": 64} | kw))


def copy_cache(cache_path: str, tmp_path: Path) -> str:
    dst = tmp_path / "copy"
    shutil.copytree(cache_path, dst)
    return str(dst)


def set_manifest(path: str, **changes) -> None:
    group = zarr.open_group(path, mode="r+")
    group.attrs["kdcache"] = {**group.attrs["kdcache"], **changes}


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99, None, "1", 0, True])
def test_cache_of_an_unknown_format_version_is_refused_with_an_upgrade_hint(cache_path, tmp_path, version):
    path = copy_cache(cache_path, tmp_path)
    set_manifest(path, format_version=version)
    with pytest.raises(UnsupportedFormat, match="upgrade kdcache") as info:
        open_cache(path)
    assert "\n" not in str(info.value)


def test_a_zarr_group_without_manifest_is_not_taken_for_a_cache(tmp_path):
    zarr.open_group(str(tmp_path / "g"), mode="w")
    with pytest.raises(CacheCorrupt, match="not a kdcache cache"):
        open_cache(str(tmp_path / "g"))
    with pytest.raises(MissingData, match="no cache at"):
        open_cache(str(tmp_path / "nothing"))


def test_the_alias_beside_a_cache_opens_the_same_cache(tmp_path, teacher_weights):
    result = precompute(config(tmp_path / "root", teacher_weights))
    assert result.path == str(tmp_path / "root" / result.cache_id)
    assert re.fullmatch(rf"fake_64-cnn-k3-{result.cache_id[:8]}", Path(result.alias).name)
    assert json.loads(Path(result.alias).read_text()) == {
        "kdcache": "alias", "format_version": 1, "cache_id": result.cache_id}
    by_alias, by_id = open_cache(result.alias), open_cache(result.path)
    assert by_alias.id == by_id.id == result.cache_id and by_alias.path == by_id.path


def test_opening_a_root_of_caches_names_one_of_its_caches(tmp_path, teacher_weights):
    result = precompute(config(tmp_path / "root", teacher_weights))
    with pytest.raises(MissingData, match=f"root of caches: .*e.g. {re.escape(result.alias)} ") as info:
        open_cache(str(tmp_path / "root"))
    assert "\n" not in str(info.value)


def test_cache_on_an_fsspec_url_is_written_reused_and_opened_by_alias(tmp_path, teacher_weights):
    root = f"memory://kdcache-test-{uuid.uuid4().hex}"
    first = precompute(config(root, teacher_weights))
    assert first.path == f"{root}/{first.cache_id}" and first.alias.startswith(root + "/")
    again = precompute(config(root, teacher_weights))
    assert again.reused and again.views_computed == 0
    local = open_cache(precompute(config(tmp_path / "local", teacher_weights)).path)
    remote = open_cache(first.alias)
    assert remote.id == local.id
    np.testing.assert_array_equal(remote.targets(np.arange(64), np.arange(64) % 3),
                                  local.targets(np.arange(64), np.arange(64) % 3))


def test_many_chunk_files_switch_to_zarr_shards_of_exactly_one_writer_shard(tmp_path, teacher_weights, monkeypatch):
    plain = open_cache(precompute(config(tmp_path / "plain", teacher_weights, features=("layer1:pooled",))).path)
    monkeypatch.setattr(writing, "MAX_CHUNK_FILES", 11)  # 64/16 chunks x 3 views = 12 chunk files per array
    sharded = open_cache(precompute(config(tmp_path / "sharded", teacher_weights, features=("layer1:pooled",))).path)
    assert not plain.manifest["layout"]["sharded"] and sharded.manifest["layout"]["sharded"]
    assert sharded.id == plain.id  # the layout is not part of the identity
    logits = zarr.open_group(sharded.path, mode="r")["logits"]
    assert logits.shards == (sharded.shard_samples, 3, 10) and logits.chunks == (16, 1, 10)
    assert len(list(Path(sharded.path, "logits", "c").rglob("*"))) < 12
    for name in plain.array_names:
        np.testing.assert_array_equal(sharded.read_samples(name, 0, 64), plain.read_samples(name, 0, 64))
    assert sharded.chunk_key("logits", 20, 2) == "logits/c/0/0/0 (inner chunk 1,2,0)"
    assert plain.chunk_key("logits", 20, 2) == "logits/c/1/2/0"


def test_every_array_checksums_each_chunk_with_crc32c(cache_path):
    group = zarr.open_group(cache_path, mode="r")
    names = ["labels", "status/shards", *open_cache(cache_path).array_names]
    assert all(type(group[name].compressors[-1]).__name__ == "Crc32cCodec" for name in names)


def test_a_layout_interrupted_before_its_manifest_is_rebuilt_in_place(tmp_path, teacher_weights):
    reference = precompute(config(tmp_path / "a", teacher_weights))
    half = tmp_path / "b" / reference.cache_id  # what a writer killed while laying out leaves behind
    zarr.open_group(str(half), mode="w").create_array("labels", shape=(3,), dtype="int8")
    result = precompute(config(tmp_path / "b", teacher_weights))
    assert result.path == str(half) and not result.reused and result.views_computed == 64 * 3
    a, b = open_cache(reference.path), open_cache(result.path)
    for name in ["labels", *a.array_names]:
        np.testing.assert_array_equal(a.read_samples(name, 0, 64), b.read_samples(name, 0, 64))


def test_cache_id_depends_on_contents_not_on_where_the_weights_lay(tmp_path, teacher_weights):
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(teacher_weights, moved)
    a = precompute(config(tmp_path / "a", teacher_weights))
    b = precompute(config(tmp_path / "b", str(moved)))
    c = precompute(config(tmp_path / "c", teacher_weights, logits="topk:3"))
    assert a.cache_id == b.cache_id != c.cache_id


def test_densified_dense_target_is_the_softmax_at_temperature():
    z = np.array([[2.0, 0.5, -1.0, 0.0]], dtype=np.float32)
    for t in (1.0, 4.0):
        expected = torch.softmax(torch.from_numpy(z) / t, dim=1).numpy()
        got = densify({"mode": "dense", "dtype": "float32"}, 4, {"logits": z}, t)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_densified_topk_target_keeps_exact_topk_probabilities_and_spreads_the_rest_uniformly():
    logp = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]]), dim=1)
    values, indices = logp.topk(2, dim=1)
    probs = densify({"mode": "topk", "k": 2, "dtype": "float32"}, 5,
                    {"topk/values": values.numpy(), "topk/indices": indices.numpy().astype(np.int16)})
    p = logp.exp().numpy()[0]
    rest = (1 - p[0] - p[4]) / 3
    np.testing.assert_allclose(probs[0], [p[0], rest, rest, rest, p[4]], rtol=1e-6)


def test_densified_sampled_target_is_counts_over_draws_ignoring_padding():
    ids = np.array([[3, 0, -1, -1]], dtype=np.int16)
    counts = np.array([[3, 1, 0, 0]], dtype=np.uint8)
    probs = densify({"mode": "sampled", "draws": 4}, 5, {"sampled/ids": ids, "sampled/counts": counts})
    np.testing.assert_allclose(probs, [[0.25, 0, 0, 0.75, 0]])


def test_bfloat16_bit_patterns_decode_like_torch():
    x = torch.tensor([1.0, -3.140625, 1e-20, 3e38, float("inf")]).to(torch.bfloat16)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(stored_logits.decode_logits(bits, "bfloat16"), x.float().numpy())


def test_accessors_agree_with_block_reads(cache_path):
    cache = open_cache(cache_path)
    block = cache.read_block(cache.target_arrays(), 16, 32, 2)
    by_pairs = cache.targets(np.arange(16, 32), np.full(16, 2), 4.0)
    np.testing.assert_array_equal(cache.teacher_probs(block, 4.0), by_pairs)
    assert cache.dense_logits and cache.target_arrays() == ["logits"] and cache.feature_layers() == {}
    assert cache.labels().shape == (64,) and cache.energy([0, 1], [0, 2], 4.0).shape == (2,)


def test_python_api_training_loop_in_the_docs_runs(cache_path):
    text = (DOCS / "python-api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25
    code = re.sub(r'^CACHE = .*$', f"CACHE = {cache_path!r}", code, flags=re.M)
    code = re.sub(r'^DATASET = .*$', 'DATASET = "fake:64"', code, flags=re.M)
    code = re.sub(r'^EPOCHS = .*$', "EPOCHS = 1", code, flags=re.M)
    scope: dict = {}
    exec(compile(code, "docs/python-api.md", "exec"), scope)  # noqa: S102 — the documented example itself
    assert np.isfinite(float(scope["loss"].detach()))
