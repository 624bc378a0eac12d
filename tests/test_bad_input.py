"""The red team: every bad input is one `Error: … — …` line, exit 2, no traceback, nothing left behind,
and option values are refused before torch is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests_support import run_cli

PRE = ["precompute", "--dataset", "fake:64", "--teacher", "cnn", "--weights", "{W}", "--out", "{OUT}", "--quiet"]
TRAIN = ["train", "--dataset", "fake:64", "--model", "cnn", "--out", "{OUT}", "--epochs", "1", "--quiet"]

CASES = [
    # (name, argv, what the line must say)
    ("views-zero", PRE + ["--views", "0"], "--views must be at least 1"),
    ("views-text", PRE + ["--views", "abc"], "Invalid value for '--views'"),
    ("energy-nan", PRE + ["--energy-t", "nan"], "--energy-t must be a finite number"),
    ("energy-inf", PRE + ["--energy-t", "inf"], "--energy-t must be a finite number"),
    ("energy-negative", PRE + ["--energy-t", "-1"], "--energy-t must be positive"),
    ("seed-negative", PRE + ["--seed", "-1"], "--seed must be an integer"),
    ("nproc-zero", PRE + ["--nproc", "0"], "--nproc must be at least 1"),
    ("device-cuda", PRE + ["--device", "cuda"], "no usable CUDA GPU"),
    ("device-unknown", PRE + ["--device", "tpu"], "unknown device"),
    ("batch-zero", PRE + ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("teacher-size", PRE + ["--teacher-size", "-3"], "--teacher-size must be positive"),
    ("teacher-norm", PRE + ["--teacher-norm", "zebra"], "unknown normalisation"),
    ("out-is-file", [a if a != "{OUT}" else "{FILE}" for a in PRE], "is a file, not a folder"),
    ("dataset", [a if a != "fake:64" else "nosuch" for a in PRE], "unknown dataset"),
    ("missing-option", PRE[:3] + PRE[5:], "Missing option '--teacher'"),
    ("weights-missing", [a if a != "{W}" else "{OUT}/none.pt" for a in PRE], "not found"),
    ("weights-pickle", [a if a != "{W}" else "{PICKLE}" for a in PRE], "pickled code"),
    ("weights-truncated", [a if a != "{W}" else "{TRUNCATED}" for a in PRE], "truncated"),
    ("logits", PRE + ["--logits", "topk:0"], "topk"),
    ("augment", PRE + ["--augment", "nosuch"], "unknown augmentation op"),
    ("config-type", PRE + ["--config", "{BADTOML}"], "Invalid value for '--views'"),
    ("lr-nan", TRAIN + ["--lr", "nan"], "--lr must be a finite number"),
    ("lr-zero", TRAIN + ["--lr", "0"], "--lr must be positive"),
    ("epochs-zero", TRAIN + ["--epochs", "0"], "--epochs must be at least 1"),
    ("train-cuda", TRAIN + ["--device", "cuda"], "no usable CUDA GPU"),
    ("train-nproc", TRAIN + ["--nproc", "0"], "--nproc must be at least 1"),
    ("train-out-file", [a if a != "{OUT}" else "{FILE}" for a in TRAIN], "is a file, not a folder"),
    ("label-noise", TRAIN + ["--label-noise", "2"], "--label-noise must lie in [0, 1]"),
    ("momentum-inf", TRAIN + ["--momentum", "inf"], "--momentum must be a finite number"),
    ("norm", TRAIN + ["--norm", "1,2/3"], "as many"),
    ("train-seed", TRAIN + ["--seed", "-1"], "--seed must be an integer"),
    ("no-cache", TRAIN + ["--cache", "{OUT}/nocache"], "no cache at"),
    ("train-missing", TRAIN[:3] + TRAIN[5:], "Missing option '--model'"),
    ("eval-split", ["eval", "--model", "cnn", "--weights", "{W}", "--dataset", "fake:64", "--split", "holdout"],
     "use train, test or val"),
    ("ls-file", ["ls", "{FILE}"], "is a file, not a folder of caches"),
    ("verify-missing", ["verify", "{OUT}/none"], "no cache at"),
    ("no-such-command", ["nosuch"], "No such command"),
]
# Refused by the options alone: reported before torch is imported (in well under a second).
WITHOUT_TORCH = {"dataset", "views-zero", "views-text", "energy-nan", "energy-inf", "energy-negative", "seed-negative",
                 "nproc-zero", "batch-zero", "teacher-size", "teacher-norm", "out-is-file", "missing-option",
                 "device-unknown", "lr-nan", "lr-zero", "epochs-zero", "train-nproc", "train-out-file", "label-noise",
                 "momentum-inf", "norm", "train-seed", "train-missing", "no-such-command", "config-type"}


class _Payload:
    """Pickled as code to import and call: what an untrusted weights file may hold."""


@pytest.fixture
def files(tmp_path, teacher_weights) -> dict[str, str]:
    pickled, truncated = tmp_path / "code.pt", tmp_path / "cut.pt"
    torch.save({"state_dict": _Payload()}, pickled)
    truncated.write_bytes(Path(teacher_weights).read_bytes()[:300])
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "bad.toml").write_text('views = "many"\n')
    return {"{W}": teacher_weights, "{OUT}": str(tmp_path / "out"), "{FILE}": str(tmp_path / "a-file"),
            "{PICKLE}": str(pickled), "{TRUNCATED}": str(truncated), "{BADTOML}": str(tmp_path / "bad.toml")}


def _argv(argv: list[str], files: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for key, value in files.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


@pytest.mark.parametrize(("name", "argv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(name, argv, expected, files, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(_argv(argv, files), capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and " — " in lines[0], err
    assert expected in lines[0] and "Traceback" not in err + out
    assert "weights_only" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache folder, run folder or run.toml


@pytest.mark.parametrize("name", sorted(WITHOUT_TORCH))
def test_option_errors_are_reported_before_torch_is_imported(name, files):
    argv = _argv(next(c[1] for c in CASES if c[0] == name), files)
    probe = ("import sys\nsys.argv = ['kdcache', *" + json.dumps(argv) + "]\nfrom kdcache_cli.main import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=dict(os.environ))
    assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)


def test_a_loss_that_turns_non_finite_stops_training_in_one_line(tmp_path, cache_path, capsys):
    code, _, err = run_cli(["train", "--dataset", "fake:64", "--model", "cnn", "--cache", cache_path, "--out",
                            str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--lr", "1e30", "--quiet", "--device", "cpu"],
                           capsys)
    assert code == 2 and "the loss became" in err and "epoch 1, step" in err and "nothing was kept" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing to resume from: nothing left


def test_resume_without_a_checkpoint_says_it_starts_afresh(tmp_path, capsys):
    code, _, err = run_cli(["train", "--dataset", "fake:64", "--model", "cnn", "--out", str(tmp_path / "run"),
                            "--epochs", "1", "--quiet", "--device", "cpu", "--resume"], capsys)
    assert code == 0 and "no checkpoint" in err and "starting afresh" in err


def test_resume_removes_partial_files_a_killed_writer_left(tmp_path, teacher_weights):
    from tests_support import precompute_config

    from kdcache.cache.store import open_cache
    from kdcache.teacher.precompute import precompute

    cfg = precompute_config(tmp_path, teacher_weights)
    path = precompute(cfg).path
    cache = open_cache(path, mode="r+")
    from kdcache.cache.integrity import reopen_shards

    reopen_shards(cache, [0])  # as if the run had been killed while writing shard 0
    orphan = Path(path) / "logits" / "c" / "0" / "0" / "0.1234abcd.partial"
    orphan.write_bytes(b"half a chunk")
    assert not precompute(cfg).reused
    assert not orphan.exists() and not list(Path(path).rglob("*.partial"))
