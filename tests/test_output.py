"""Output streams: progress bars go to stderr (off with --quiet), and --json prints only JSON on stdout."""

from __future__ import annotations

import json

import pytest
from tests_support import run_cli


@pytest.mark.parametrize("argv", [["info", "{cache}", "--json"], ["verify", "{cache}", "--json"],
                                  ["ls", "{root}", "--json"]])
def test_json_flag_prints_only_json_on_stdout(argv, cache_path, capsys):
    root = cache_path.rstrip("/").rpartition("/")[0]
    code, out, _ = run_cli([a.format(cache=cache_path, root=root) for a in argv], capsys)
    assert code == 0
    json.loads(out)


def test_precompute_shows_a_views_per_second_bar_on_stderr_unless_quiet(tmp_path, teacher_weights, capsys):
    base = ["precompute", "--dataset", "fake:16", "--teacher", "cnn", "--weights", teacher_weights, "--views", "2",
            "--batch-size", "8"]
    code, out, err = run_cli([*base, "--out", str(tmp_path / "a")], capsys)
    assert code == 0 and "precompute: 100%" in err and "view/s]" in err and "%|" not in out
    code, out, err = run_cli([*base, "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 0 and err == "" and "written to" in out
