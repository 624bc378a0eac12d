"""`kdcache verify --recompute`: replayed views rerun through the teacher must match the cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tests_support import run_cli, save_cnn_teacher

from kdcache import models
from kdcache.audit import pick_pairs, recompute
from kdcache.cache.store import open_cache
from kdcache.cache.view_sets import view_sets
from kdcache.errors import WeightsMismatch
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute

ALL = "1000"  # more pairs than the 64 x 3 views of the cache: every view is replayed


@pytest.fixture
def tampered(cache_path, tmp_path) -> Path:
    """A private copy of the shared cache, free to modify through zarr, whose chunks are not bound to their place:
    what a forger who also rewrote the chunk digests leaves (or a cache made before format 5). Only recomputing
    the teacher's outputs catches an edit then."""
    dst = tmp_path / "copy"
    shutil.copytree(cache_path, dst)
    meta = dst / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["kdcache"]["layout"]["bound"]
    meta.write_text(json.dumps(doc))
    return dst


def bad_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("BAD")]


def test_a_good_cache_replays_clean_with_exit_0(cache_path, teacher_weights, capsys):
    code, out, _ = run_cli(["verify", cache_path, "--recompute", "20", "--weights", teacher_weights], capsys)
    assert code == 0, out
    assert "intact" in out and "20 views replayed" in out


def test_an_overwritten_rrc_row_fails_naming_the_array_op_and_view(tampered, teacher_weights, capsys):
    rrc = zarr.open_group(str(tampered), mode="r+")["aug/rrc"]
    assert rrc.dtype == np.uint16  # fixed point, q / 65535
    rrc[17, 1] = np.round(np.array([0.1, 0.2, 0.5, 0.4]) * 65535).astype(np.uint16)
    code, out, _ = run_cli(["verify", str(tampered), "--recompute", ALL, "--weights", teacher_weights], capsys)
    assert code == 1
    bad = bad_lines(out)
    assert len(bad) == 1 and bad[0].startswith("BAD  aug/rrc: (17, 1)"), bad
    assert "op rrc" in bad[0] and "replays to a different view: logits differ by" in bad[0]
    assert re.search(r"max \|Δ\| [0-9]+\)", bad[0]), bad[0]  # integer steps, not 1.23e+04


def test_an_overwritten_logit_fails_naming_the_logits_and_view(tampered, teacher_weights, capsys):
    arr = zarr.open_group(str(tampered), mode="r+")["logits"]
    arr[40, 2, 5] = np.float16(float(arr[40, 2, 5]) + 3.0)
    code, out, _ = run_cli(["verify", str(tampered), "--recompute", ALL, "--weights", teacher_weights], capsys)
    assert code == 1
    bad = bad_lines(out)
    assert len(bad) == 1 and bad[0].startswith("BAD  logits: (40, 2) replays"), bad
    assert "differ by 3" in bad[0] and "[chunk logits/c/2/2/0]" in bad[0]


def test_an_unrounded_fp16_error_is_within_tolerance_but_one_ulp_more_is_not(tampered, teacher_weights):
    arr = zarr.open_group(str(tampered), mode="r+")["logits"]
    z = arr[3, 0].astype(np.float32)
    arr[3, 0] = np.nextafter(z.astype(np.float16), np.float16(np.inf))  # one float16 ulp up: rounding-sized
    assert recompute(str(tampered), 1000, [teacher_weights]).ok
    arr[3, 0] = (z + 0.05 * (np.abs(z) + 1)).astype(np.float16)  # 5% off: far beyond 4 ulps
    assert not recompute(str(tampered), 1000, [teacher_weights]).ok


def test_another_weights_file_is_a_one_line_error_before_any_replay(cache_path, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(models.create_model("cnn", 10, 3).state_dict(), other)
    with pytest.raises(WeightsMismatch):
        recompute(cache_path, 5, [str(other)])
    code, _, err = run_cli(["verify", cache_path, "--recompute", "5", "--weights", str(other)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pass the weights the cache was made with" in err


def test_a_cache_of_float32_rrc_boxes_is_a_one_line_error(tampered, teacher_weights, capsys):
    group = zarr.open_group(str(tampered), mode="r+")
    manifest = group.attrs["kdcache"]
    assert manifest["recipe"]["augment"]["ops"][0]["op"] == "rrc"
    manifest["recipe"]["augment"]["ops"][0]["version"] = 1  # as written before the box became uint16
    group.attrs["kdcache"] = manifest
    code, _, err = run_cli(["verify", str(tampered), "--recompute", "5", "--weights", teacher_weights], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "augmentation op 'rrc' was sampled by an older kdcache (op version 1" in err and "re-run precompute" in err


def test_recompute_without_weights_uses_the_recorded_files_and_names_a_missing_one(tmp_path, capsys):
    weights = save_cnn_teacher(tmp_path, "gone.pt", seed=5, scale=10)
    path = precompute(PrecomputeConfig(dataset="fake:64", teacher="cnn", weights=weights, out=str(tmp_path / "root"),
                                       views=2, progress=False)).path
    code, out, _ = run_cli(["verify", path, "--recompute", "5"], capsys)
    assert code == 0 and "5 views replayed" in out
    Path(weights).unlink()
    code, _, err = run_cli(["verify", path, "--recompute", "5"], capsys)
    assert code == 2 and "--weights" in err and "gone.pt" in err and len(err.strip().splitlines()) == 1


def test_the_replayed_pairs_are_a_pure_function_of_the_seed(cache_path):
    sets = view_sets(open_cache(cache_path))

    def flat(seed: int) -> list[tuple[int, int]]:
        return [(int(r), int(v)) for _, rows, views in pick_pairs(sets, 10, seed) for r, v in zip(rows, views)]

    assert flat(0) == flat(0) and flat(0) != flat(1)
    assert len(set(flat(0))) == 10


@pytest.mark.parametrize("logits", ["topk:3", "sampled:20"])
def test_sparse_caches_with_features_replay_clean_and_catch_tampering(tmp_path, teacher_weights, logits):
    result = precompute(PrecomputeConfig(dataset="fake:64", teacher="cnn", weights=teacher_weights,
                                         out=str(tmp_path), views=2, batch_size=64, chunk_samples=16,
                                         logits=logits, features=("layer2:attention",), progress=False))
    assert recompute(result.path, 1000, [teacher_weights]).ok
    group = zarr.open_group(result.path, mode="r+")
    name = "topk/indices" if logits.startswith("topk") else "sampled/counts"
    row = group[name][9, 1]
    group[name][9, 1] = row[::-1]  # the same numbers, assigned to the wrong classes
    report = recompute(result.path, 1000, [teacher_weights])
    assert [(p.array, p.what.split(" ")[:3]) for p in report.problems] == [(name, ["(9,", "1)", "replays"])]


def test_a_nan_on_one_side_is_a_difference_and_equal_infinities_are_not():
    """A replay that gives NaN matched every stored value before (NaN > tolerance is False): a manifest edited to a
    NaN normalisation passed `verify --recompute` as intact (red-team 2026-12-07)."""
    from kdcache.audit import _excess

    inf, nan = np.inf, np.nan
    stored = np.array([[1.0, -inf], [1.0, -inf], [2.0, 3.0], [nan, 0.0]])
    replayed = np.array([[1.0, -inf], [nan, -inf], [2.0, 3.0], [nan, 0.0]])
    assert _excess(stored, replayed, "float32").tolist() == [0.0, inf, 0.0, inf]
