"""Benchmark scripts that must not rot: their CPU runs at tiny sizes."""

from __future__ import annotations

import json


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
