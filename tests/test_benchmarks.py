"""Benchmark scripts that must not rot: their CPU runs at tiny sizes."""

from __future__ import annotations

import json

import pytest


def test_the_gpu_benchmark_runs_on_a_cpu_at_tiny_sizes_and_prints_one_json(tmp_path, capsys):
    from benchmarks import gpu

    record = gpu.main(["--tiny", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(record))
    assert record["precision"] == "fp32" and record["tiny"]
    for phase in ("precompute_jpeg", "precompute_memory_32px"):
        assert record[phase]["views_per_s"] > 0 and record[phase]["bare_views_per_s"] > 0
    training = record["training"]
    assert {"from_cache", "alone", "online_kd"} <= set(training) and training["cached_vs_alone"] > 0
    assert 0 <= record["data_wait_share"] <= 1
    assert (tmp_path / "gpu.json").is_file()


def test_the_fake_data_benchmark_compares_the_formula_with_torchvision(tmp_path, capsys, monkeypatch):
    from benchmarks import fake_data

    monkeypatch.setattr(fake_data, "torchvision_fake", lambda count, side: 125.0)  # FakeData costs seconds
    record = fake_data.main(["--quick", "--reps", "1", "--out", str(tmp_path)])
    assert [row["side"] for row in record["rows"]] == [8, 32]
    assert all(row["formula_images_per_s"] > 0 and row["speed-up"] > 0 for row in record["rows"])


@pytest.mark.slow
def test_the_scaling_benchmark_runs_every_stage_and_counts_files(tmp_path, capsys, monkeypatch):
    from benchmarks import scaling

    monkeypatch.setattr(scaling, "s3_requests", lambda root, n, weights: None)
    monkeypatch.setattr(scaling, "DENSE_UP_TO", 0)
    record = scaling.main(["--sizes", "256", "--out", str(tmp_path), "--chart", str(tmp_path / "s.png")])
    rows = record["rows"]
    assert [(r["stage"], r["logits"]) for r in rows] == [
        (stage, "topk:10") for stage in scaling.STAGES]
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    precompute = [r for r in rows if r["stage"] == "precompute"]
    assert all(r["files"] > 0 and r["bytes_per_view"] > 0 for r in precompute)
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.slow
def test_the_data_sources_benchmark_measures_every_source_side_by_side(tmp_path, capsys):
    """Tiny sizes; with SeaweedFS (kdcache[dev]) the S3 row is there too. Neither its server's credentials
    nor fsspec's cached client of it outlive the run: later S3 tests in the process met a server that was gone."""
    import os

    from benchmarks import data_sources

    environment = dict(os.environ)
    record = data_sources.main(["--quick", "--images", "40", "--reps", "1", "--out", str(tmp_path)])
    assert dict(os.environ) == environment
    sources = [row["source"] for row in record["rows"]]
    assert sources[:2] == ["folder", "wds local"] and sources[-1] == "folder, reduced decode"
    assert {"wds S3", "hfds"} <= set(sources)
    assert all(row["precompute views/s"] > 0 for row in record["rows"])
    assert record["decode"]["full_per_s"] > 0 and record["decode"]["ratio"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "data_sources"


def test_the_interop_benchmark_measures_replay_export_and_import(tmp_path, capsys):
    from benchmarks import interop

    record = interop.main(["--quick", "--reps", "1", "--out", str(tmp_path)])
    assert [row["replay"] for row in record["replay"]] == ["rrc+flip", "pilrrc+flip"]
    assert all(row["views/s"] > 0 for row in record["replay"]) and record["replay"][0]["vs rrc"] == 1.0
    assert record["export_views_per_s"] > 0 and record["import_views_per_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "interop"


def test_the_tinyvit_index_benchmark_measures_memory_over_epochs(tmp_path, capsys):
    from benchmarks import tinyvit_index

    record = tinyvit_index.main(["--samples", "20000", "--epochs", "2,6", "--out", str(tmp_path)])
    assert [row["epochs"] for row in record["rows"]] == [2, 6]
    assert all(row["peak_mib"] > 0 and row["seconds"] > 0 for row in record["rows"])
    assert record["bytes_per_sample_epoch"] < 2  # spilled: flat in the epochs (in memory it grew by 8 B)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "tinyvit_index"


@pytest.mark.slow
def test_the_binding_benchmark_reads_one_cache_bound_and_unbound(tmp_path, capsys):
    from benchmarks import binding

    record = binding.main(["--quick", "--reps", "2", "--out", str(tmp_path)])
    assert record["loader"]["ratio"] > 0 and record["block_reads"]["ratio"] > 0
    assert record["bytes_bound"] > record["bytes_unbound"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "binding"


@pytest.mark.slow
def test_the_replay_benchmark_sets_each_replay_beside_its_library(tmp_path, capsys):
    pytest.importorskip("timm")
    from benchmarks import replay

    record = replay.main(["--quick", "--reps", "1", "--out", str(tmp_path)])
    assert [(row["replay"], row["library"]) for row in record["rows"]] == list(replay.PAIRS)
    assert all(row["views/s"] > 0 and row["library views/s"] > 0 and row["ratio"] > 0 for row in record["rows"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "replay"
