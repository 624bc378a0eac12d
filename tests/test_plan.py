"""Planning a precompute (--dry-run): it writes nothing, and its estimates match the real run."""

from __future__ import annotations

import os

import pytest
from kdcache_cli.main import app
from tests_support import precompute_config
from typer.testing import CliRunner

from kdcache.cache.store import open_cache
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.plan import plan
from kdcache.teacher.precompute import precompute

DATASET = "fake:64"


def config(out, weights, **kw) -> PrecomputeConfig:
    return precompute_config(out, weights, **({"dataset": DATASET} | kw))


def tree(path) -> list[tuple[str, int]]:
    return sorted((os.path.join(d, f), os.path.getsize(os.path.join(d, f))) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("kw", [
    {},
    {"logits": "topk:5", "features": ("layer1:full",)},
    {"logits": "sampled:20", "logit_dtype": "bfloat16", "features": ("layer2",)},
])
def test_dry_run_writes_nothing_and_its_byte_estimate_is_within_25_percent_of_the_real_cache(tmp_path,
                                                                                              teacher_weights, kw):
    cfg = config(tmp_path / "root", teacher_weights, **kw)
    estimate = plan(cfg)
    assert not (tmp_path / "root").exists()
    cache = open_cache(precompute(cfg).path)
    real = {name: cache.array_bytes(name)[0] for name in ["labels", *cache.array_names]}
    assert set(estimate.arrays) == set(real)
    assert abs(estimate.total_bytes / sum(real.values()) - 1) < 0.25
    assert estimate.forward_passes == 64 * 3 and estimate.cache_id == cache.id and not estimate.reuses
    assert estimate.views_per_second > 0 and estimate.seconds > 0
    assert plan(cfg).reuses and plan(cfg).forward_passes == 0


def test_dry_run_of_an_ensemble_counts_a_forward_pass_per_member_and_view(tmp_path, teacher_weights):
    cfg = config(tmp_path, (teacher_weights,) * 2, teacher=("cnn", "cnn"), keep_members=True, views=2)
    estimate = plan(cfg, warmup=40)
    assert estimate.forward_passes == 64 * 2 * 2 and estimate.warmup_views == 40
    assert {"members/0/logits", "members/1/logits"} <= set(estimate.arrays)


def test_cli_dry_run_prints_the_plan_and_leaves_the_root_unchanged(tmp_path, teacher_weights):
    root = tmp_path / "root"
    precompute(config(root, teacher_weights, views=1))
    before = tree(root)
    result = CliRunner().invoke(app, ["precompute", "--dataset", DATASET, "--teacher", "cnn", "--weights",
                                      teacher_weights, "--out", str(root), "--views", "4", "--batch-size", "32",
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "teacher forward passes: 256 (64 samples x 4 views x 1 member)" in result.stdout
    assert "estimated time" in result.stdout and "total" in result.stdout
    assert tree(root) == before
