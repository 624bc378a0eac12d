"""The built-in demo: its five stages, the summary line, its own thread count, and refused options."""

from __future__ import annotations

import re

import pytest
import torch

from kdcache.quickstart import QuickstartConfig, Stage, run_quickstart, summary
from tests_support import run_cli

TINY = ["--dataset", "fake:64", "--teacher", "cnn", "--student", "cnn", "--size", "8", "--teacher-epochs", "1",
        "--epochs", "1", "--views", "2", "--threads", "1", "--quiet"]


def test_quickstart_prints_five_stages_and_what_the_cache_saved(tmp_path, capsys):
    code, out, err = run_cli(["quickstart", "--out", str(tmp_path / "qs"), *TINY], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| teacher cnn (CE)", "| precompute 2 views", "| student cnn alone (CE)",
        "| student cnn, teacher online (kd)", "| student cnn from the cache (kd)"]
    assert re.search(r"cost ratio \(online KD time ÷ cached time\): \d+\.\d\d×; accuracy gap cached − online: "
                     r"[+-]\d+\.\d\d pp; cached − alone: [+-]\d+\.\d\d pp", out)
    for name in ("teacher", "cache", "student-ce", "student-online-kd", "student-cached-kd"):
        assert (tmp_path / "qs" / name).is_dir()


def test_quickstart_runs_at_its_own_thread_count_and_restores_the_callers(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("kdcache.quickstart.train", lambda cfg: seen.append(torch.get_num_threads()))
    monkeypatch.setattr("kdcache.quickstart.precompute", lambda cfg: type("C", (), {"path": "c"})())
    before = torch.get_num_threads()
    run_quickstart(QuickstartConfig(out=str(tmp_path), threads=1, progress=False), log=lambda msg: None)
    assert seen == [1, 1, 1, 1] and torch.get_num_threads() == before


def test_summary_states_ratio_gaps_and_break_even():
    stages = [Stage("t", 98.0, 40.0), Stage("p", None, 20.0), Stage("a", 95.0, 10.0), Stage("o", 97.5, 30.0),
              Stage("c", 97.0, 10.0)]
    assert summary(stages) == ("cost ratio (online KD time ÷ cached time): 3.00×; accuracy gap cached − online: "
                               "-0.50 pp; cached − alone: +2.00 pp; the precompute pays for itself after 1.0 students")


@pytest.mark.parametrize(("argv", "words"), [
    (["--loss", "energy_kd"], "energy"), (["--views", "0"], "--views"), (["--threads", "0"], "--threads"),
    (["--loss", "nosuch"], "unknown loss"), (["--dataset", "nosuch"], "nosuch")])
def test_quickstart_refuses_bad_options_in_one_line_before_any_stage(tmp_path, capsys, argv, words):
    code, out, err = run_cli(["quickstart", "--out", str(tmp_path / "qs"), *TINY, *argv], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0]
    assert not (tmp_path / "qs").exists()
