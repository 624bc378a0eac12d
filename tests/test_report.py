"""kdcache report: markdown tables of runs, PNG curves and a cache's energy histogram."""

from __future__ import annotations

import sys

import pytest
from kdcache_cli.main import main

from kdcache.cache.store import open_cache
from kdcache.errors import MissingData, MissingDependency
from kdcache.report import load_runs, summary_table, write_report
from kdcache.student.config import TrainConfig
from kdcache.student.train import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[str]:
    """Three real tiny runs: ce with seeds 0 and 1 (one setting), and ce at another learning rate."""
    root = tmp_path_factory.mktemp("runs")
    settings = [("ce-s0", 0, 0.05), ("ce-s1", 1, 0.05), ("ce-lr", 0, 0.1)]
    for name, seed, lr in settings:
        train(TrainConfig(dataset="fake:64", model="cnn", out=str(root / name), epochs=2, batch_size=32, lr=lr,
                          seed=seed, progress=False))
    return [str(root / name) for name, _, _ in settings]


def test_report_writes_curves_energy_histogram_and_a_table_of_runs(tmp_path, runs, cache_path):
    written = write_report(runs, tmp_path / "report", open_cache(cache_path))
    assert [p.name for p in written] == ["runs.md", "curves.png", "energy.png"]
    for png in written[1:]:
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    table = written[0].read_text()
    for name in ("ce-s0", "ce-s1", "ce-lr"):
        assert f"| {name} | cnn | ce |" in table


def test_runs_that_differ_only_in_seed_are_summarised_as_mean_and_std(runs):
    loaded = load_runs(runs)
    lines = summary_table(loaded).splitlines()[2:]
    assert len(lines) == 2
    seeds = [float(r.final["test_top1"]) for r in loaded[:2]]
    mean = sum(seeds) / 2
    assert lines[0].startswith("| ce | cnn | 2 | ") and f"{mean:.2f} ± " in lines[0]
    assert "| ce | cnn | 1 | " in lines[1] and "±" not in lines[1]


def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path):
    with pytest.raises(MissingData, match="not a finished training run"):
        load_runs([tmp_path])


def test_plots_without_matplotlib_are_a_one_line_missing_dependency(tmp_path, runs, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'kdcache\[plots\]'"):
        write_report(runs, tmp_path / "report")


def test_report_command_prints_what_it_wrote(tmp_path, runs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kdcache", "report", *runs, "--out", str(tmp_path / "r")])
    main()  # returns on success, as the console script expects (sys.exit(main()) exits 0)
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "r" / "runs.md"), str(tmp_path / "r" / "curves.png")]
