"""Inspection: `kdcache info`, `kdcache verify` (integrity, naming each bad array and chunk) and `kdcache ls`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from tests_support import precompute_config, run_cli

from kdcache.cache import writing
from kdcache.cache.info import describe, list_caches
from kdcache.cache.integrity import verify
from kdcache.cache.store import open_cache
from kdcache.teacher.config import PrecomputeConfig
from kdcache.teacher.precompute import precompute


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(argv, capsys)


def config(out, weights, **kw) -> PrecomputeConfig:
    return precompute_config(out, weights, **({"batch_size": 64} | kw))


@pytest.fixture
def damaged(cache_path, tmp_path) -> Path:
    """A private copy of the shared cache, free to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(cache_path, dst)
    return dst


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_cache_verifies_clean_with_exit_0(cache_path, capsys):
    report = verify(cache_path)
    assert report.ok and report.shards_done == report.num_shards
    # 64 samples / 16 per chunk = 4 chunk rows: labels 4 chunks, each per-view array 4 x 3 views
    per_view = len(open_cache(cache_path).array_names)
    assert report.chunks_read == 4 + per_view * 4 * 3
    code, out, _ = run(["verify", cache_path], capsys)
    assert code == 0 and "intact" in out


def test_one_flipped_byte_in_a_chunk_file_fails_verify_naming_array_and_chunk(damaged, capsys):
    flip_byte(damaged / "logits" / "c" / "2" / "1" / "0")
    code, out, _ = run(["verify", str(damaged)], capsys)
    assert code == 1
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert bad == [line for line in bad if "logits" in line] and len(bad) == 1
    assert "[chunk logits/c/2/1/0]" in bad[0] and "checksum" in bad[0]
    code, out, _ = run(["verify", str(damaged), "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert report["problems"] == [{"array": "logits", "chunk": "logits/c/2/1/0", "what": report["problems"][0]["what"]}]


def test_a_flipped_byte_in_a_zarr_shard_names_the_shard_file(tmp_path, teacher_weights, monkeypatch, capsys):
    monkeypatch.setattr(writing, "MAX_CHUNK_FILES", 1)
    result = precompute(config(tmp_path / "root", teacher_weights))
    flip_byte(Path(result.path) / "energy" / "c" / "0" / "0" / "0")
    report = verify(result.path)
    assert not report.ok and {p.array for p in report.problems} == {"energy"}
    assert all(p.chunk.startswith("energy/c/0/0/0 (inner chunk") for p in report.problems)


def test_deleted_chunk_file_is_reported_missing(damaged):
    (damaged / "aug" / "rrc" / "c" / "3" / "0" / "0").unlink()
    report = verify(str(damaged))
    assert [(p.array, p.chunk, p.what) for p in report.problems] == [
        ("aug/rrc", "aug/rrc/c/3/0/0", "chunk file missing")]


def test_nan_and_inf_in_float_arrays_are_reported_per_chunk(damaged):
    group = zarr.open_group(str(damaged), mode="r+")
    group["logits"][5, 1, 3] = np.nan
    group["energy"][40, 2, 0] = np.inf
    problems = {(p.array, p.chunk, p.what) for p in verify(str(damaged)).problems}
    moved = "holds values that are not the ones written there (moved from another position, view or array, or changed)"
    assert problems == {("logits", "logits/c/0/1/0", "1 NaN/Inf values"),
                        ("energy", "energy/c/2/2/0", "1 NaN/Inf values"),
                        ("logits", "logits/c/0/1/0", moved), ("energy", "energy/c/2/2/0", moved)}


def test_unwritten_shards_make_verify_fail_naming_them(damaged):
    group = zarr.open_group(str(damaged), mode="r+")
    group["status/shards"][0] = 0
    group.attrs["kdcache"] = {**group.attrs["kdcache"], "status": "writing"}
    report = verify(str(damaged))
    assert [p.array for p in report.problems] == ["status/shards"] and "shards 0 of 1" in report.problems[0].what


def test_verify_of_no_cache_exits_2(tmp_path, capsys):
    code, _, err = run(["verify", str(tmp_path / "none")], capsys)
    assert code == 2 and err.startswith("Error: no cache at")


def test_info_reports_sizes_teacher_top1_and_energy_quantiles(cache_path, capsys):
    cache = open_cache(cache_path)
    d = describe(cache_path)
    logits = cache.read_samples("logits", 0, 64).astype(np.float32)
    expected_top1 = 100.0 * float((logits.argmax(-1) == cache.labels()[:, None]).mean())
    assert d["teacher_top1"] == pytest.approx(expected_top1) and d["views_scanned"] == 64 * 3
    energy = cache.read_samples("energy", 0, 64)
    assert d["energy_quantiles"]["4.0"] == pytest.approx(np.quantile(energy[..., 1], [0, .2, .5, .8, 1]), abs=1e-4)
    a = d["arrays"]["logits"]
    assert a["raw_bytes"] == 64 * 3 * 10 * 2 and 0 < a["stored_bytes"]
    assert a["ratio"] == a["raw_bytes"] / a["stored_bytes"]
    assert d["bytes_per_view"] == pytest.approx(sum(
        v["stored_bytes"] for k, v in d["arrays"].items() if k != "labels") / (64 * 3))
    code, out, _ = run(["info", cache_path], capsys)
    assert code == 0 and cache.id in out and "status complete" in out and "teacher top-1" in out
    code, out, _ = run(["info", cache_path, "--json", "--quick"], capsys)
    assert code == 0 and json.loads(out)["manifest"]["cache_id"] == cache.id and "teacher_top1" not in json.loads(out)


def test_info_top1_of_sparse_caches_matches_the_dense_one(tmp_path, teacher_weights, cache_path):
    dense = describe(cache_path)["teacher_top1"]
    topk = describe(precompute(config(tmp_path / "r", teacher_weights, logits="topk:2", batch_size=50)).path)
    assert topk["teacher_top1"] == pytest.approx(dense)
    assert set(topk["arrays"]) >= {"topk/values", "topk/indices"}


def test_ls_lists_every_cache_of_a_root_with_alias_modes_and_status(tmp_path, teacher_weights, capsys):
    root = tmp_path / "root"
    a = precompute(config(root, teacher_weights))
    b = precompute(config(root, teacher_weights, logits="sampled:20", features=("layer2",)))
    (root / "not-a-cache").mkdir()
    rows = {r["id"]: r for r in list_caches(str(root))}
    assert set(rows) == {a.cache_id, b.cache_id}
    assert rows[a.cache_id]["alias"] == [a.alias] and rows[a.cache_id]["modes"] == "dense/float16"
    assert rows[b.cache_id]["modes"] == "sampled:20 layer2:attention"
    assert all(r["status"] == "complete" and r["size_bytes"] > 0 and r["views"] == 3 for r in rows.values())
    code, out, _ = run(["ls", str(root)], capsys)
    assert code == 0 and a.cache_id in out and Path(b.alias).name in out
    code, out, _ = run(["ls", str(root), "--json"], capsys)
    assert code == 0 and {r["id"] for r in json.loads(out)} == {a.cache_id, b.cache_id}


def test_info_energy_quantiles_use_a_bounded_even_sample_beyond_energy_sample(cache_path, monkeypatch):
    """64 samples x 3 views = 192 views; a bound of 50 keeps every 4th view (48) and the exact extremes."""
    from kdcache.cache import info

    monkeypatch.setattr(info, "ENERGY_SAMPLE", 50)
    energy = open_cache(cache_path).read_samples("energy", 0, 64).reshape(-1, 2)
    d = describe(cache_path)
    assert d["energy_quantile_views"] == 48
    sample = energy[::4, 1]
    expected = np.quantile(sample, [0, .2, .5, .8, 1])
    expected[0], expected[-1] = energy[:, 1].min(), energy[:, 1].max()
    assert d["energy_quantiles"]["4.0"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("argv", [["info", "{cache}"], ["info", "{cache}", "--quick"], ["verify", "{cache}"],
                                  ["ls", "{root}"]])
def test_cache_commands_that_need_no_model_never_import_torch(cache_path, argv):
    """ls, info and verify read the manifest and chunks only; importing torch alone costs seconds."""
    import subprocess
    import sys

    args = [a.format(cache=cache_path, root=str(Path(cache_path).parent)) for a in argv]
    script = ("import sys\nfrom kdcache_cli.main import main\nsys.argv = ['kdcache', *sys.argv[1:]]\n"
              "try:\n    main()\nfinally:\n    print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr[-2000:]
