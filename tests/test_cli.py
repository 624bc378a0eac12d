"""The command line: thin over the library, one-line errors with exit code 2, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests_support import run_cli

from kdcache.cache.store import open_cache


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(argv, capsys)


@pytest.mark.parametrize("command", ["datasets", "models", "losses"])
def test_registry_listings_name_their_entries(command, capsys):
    code, out, _ = run([command], capsys)
    assert code == 0
    expected = {"datasets": "mnist5k", "models": "resnet8x4", "losses": "energy_kd"}[command]
    assert expected in out


def test_layers_lists_named_layers_with_shapes(capsys):
    code, out, _ = run(["layers", "resnet8x4", "--dataset", "fake:8"], capsys)
    assert code == 0 and "layer3" in out and "256x8x8" in out


def test_full_pipeline_through_the_cli(tmp_path, capsys):
    teacher, cache, student = tmp_path / "t", tmp_path / "c", tmp_path / "s"
    base = ["--dataset", "fake:32", "--quiet"]
    assert run(["train", *base, "--model", "cnn", "--epochs", "1", "--out", str(teacher)], capsys)[0] == 0
    code, out, _ = run(["precompute", *base, "--teacher", "cnn", "--weights", str(teacher / "model.pt"),
                        "--views", "2", "--out", str(cache)], capsys)
    assert code == 0 and "written to" in out
    code, out, _ = run(["precompute", *base, "--teacher", "cnn", "--weights", str(teacher / "model.pt"),
                        "--views", "2", "--out", str(cache)], capsys)
    assert code == 0 and "reusing complete cache" in out
    # --out is a root: the cache is ROOT/<id>, with the alias file ROOT/<alias> beside it; both open it
    alias = next(p for p in cache.iterdir() if p.is_file() and ".lock" not in p.name)  # the lock file lies there too
    cache = next(p for p in cache.iterdir() if p.is_dir())
    code, out, _ = run(["train", *base, "--model", "cnn", "--cache", str(alias), "--loss", "kd",
                        "-p", "T=2", "--epochs", "1", "--out", str(student)], capsys)
    assert code == 0 and "test top-1" in out
    assert json.loads((student / "run.json").read_text())["loss_params"] == {"T": "2"}
    code, out, _ = run(["eval", "--model", "cnn", "--weights", str(student / "model.pt"), "--dataset", "fake:32",
                        "--json"], capsys)
    assert code == 0 and set(json.loads(out)) == {"top1", "top5", "ece", "loss"}
    code, out, _ = run(["info", str(cache)], capsys)
    assert code == 0 and open_cache(str(cache)).id in out and "status complete" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--dataset", "nosuch", "--model", "cnn", "--out", "{tmp}/r"],
        ["train", "--dataset", "fake:8", "--model", "nosuchnet", "--out", "{tmp}/r"],
        ["train", "--dataset", "fake:8", "--model", "cnn", "--loss", "nosuchloss", "--out", "{tmp}/r"],
        ["train", "--dataset", "fake:8", "--model", "cnn", "--cache", "{tmp}/missing", "--out", "{tmp}/r"],
        ["train", "--dataset", "fake:0", "--model", "cnn", "--out", "{tmp}/r"],
        ["precompute", "--dataset", "fake:8", "--teacher", "cnn", "--weights", "{tmp}/none.pt", "--out", "{tmp}/c"],
        ["precompute", "--dataset", "fake:8", "--teacher", "cnn", "--weights", "{tmp}/none.pt", "--views", "0",
         "--out", "{tmp}/c"],
        ["precompute", "--dataset", "fake:8", "--teacher", "cnn", "--weights", "{tmp}/none.pt", "--workers", "-1",
         "--out", "{tmp}/c"],
        ["train", "--dataset", "fake:8", "--model", "cnn", "--workers", "-1", "--out", "{tmp}/r"],
        ["eval", "--model", "cnn", "--weights", "{tmp}/none.pt", "--dataset", "fake:8"],
        ["info", "{tmp}/missing"],
    ],
)
def test_bad_input_prints_one_error_line_and_exits_2(argv, tmp_path, capsys):
    code, out, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_class_count_mismatch_of_teacher_weights_is_one_line(tmp_path, capsys, teacher_weights):
    code, _, err = run(["precompute", "--dataset", "fake:16:5", "--teacher", "cnn", "--weights", teacher_weights,
                        "--out", str(tmp_path / "c"), "--quiet"], capsys)
    assert code == 2 and err.startswith("Error: ") and "fc.weight" in err and err.count("\n") == 1


def test_train_refuses_cache_of_another_dataset_with_exit_2(tmp_path, capsys, cache_path):
    code, _, err = run(["train", "--dataset", "fake:65", "--model", "cnn", "--cache", cache_path,
                        "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and err.startswith("Error: cache ") and "fake:64" in err and err.count("\n") == 1


@pytest.mark.slow
def test_console_script_and_module_entry_point_work():
    out = subprocess.run([sys.executable, "-m", "kdcache", "datasets"], capture_output=True, text=True)
    assert out.returncode == 0 and "mnist5k" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "kdcache", "train", "--dataset", "x", "--model", "cnn",
                          "--out", "/tmp/unused"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("Error: ") and "Traceback" not in bad.stderr
