"""Every run saves its fully resolved config, and rerunning from that config alone reproduces it:
the same cache id for precompute, the same final weights for train."""

from __future__ import annotations

import json

import torch
from kdcache_cli.config import write_toml
from tests_support import run_cli

from kdcache.cache.store import open_cache
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

DATASET = "fake:32"
NOT_OPTIONS = ("chunk_samples", "sharded", "progress")  # PrecomputeConfig fields the CLI does not take


def test_precompute_manifest_holds_its_config_and_rerunning_it_gives_the_same_cache_id(tmp_path, teacher_weights,
                                                                                          capsys):
    cfg = PrecomputeConfig(dataset=DATASET, teacher="cnn", weights=teacher_weights, out=str(tmp_path / "a"),
                           views=2, logits="topk:3", features=("layer1:pooled",), energy_t=(2.0,), progress=False)
    first = precompute(cfg)
    saved = open_cache(first.path).manifest["config"]
    assert saved["logits"] == "topk:3" and saved["features"] == ["layer1:pooled"] and saved["views"] == 2
    assert precompute(PrecomputeConfig(**{**saved, "out": str(tmp_path / "b")})).cache_id == first.cache_id
    # the same through the CLI: the saved config as a TOML file is all `precompute --config` needs
    config = tmp_path / "run.toml"
    config.write_text(write_toml({k: v for k, v in saved.items() if k not in NOT_OPTIONS} | {"out": str(tmp_path / "c")}))
    code, out, err = run_cli(["precompute", "--config", str(config), "--quiet"], capsys)
    assert code == 0, err
    assert first.cache_id in out


def test_train_writes_run_toml_and_rerunning_it_gives_the_same_final_weights(tmp_path, cache_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = run_cli(["train", "--dataset", "fake:64", "--model", "cnn", "--cache", cache_path, "--epochs", "1",
                            "--batch-size", "16", "--lr", "0.02", "-p", "T=2", "--quiet", "--out", str(first)], capsys)
    assert code == 0, err
    saved = (first / "run.toml").read_text()
    assert 'model = "cnn"' in saved and "lr = 0.02" in saved and 'loss_param = ["T=2"]' in saved
    code, _, err = run_cli(["train", "--config", str(first / "run.toml"), "--out", str(second)], capsys)
    assert code == 0, err
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "run.json").read_text())["epochs"] == 1
