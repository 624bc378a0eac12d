"""``kdcache upgrade``: an old cache's manifest rewritten in today's format, in place, under the writer
lock, in one write that a crash cannot leave half done, with no array byte changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from tests_support import run_cli

from kdcache import open_cache
from kdcache.cache.formats import FORMAT_VERSION, normalise
from kdcache.cache.lock import WriterLock
from kdcache.cache.manifest import cache_id
from kdcache.cache.store import CacheWriter
from kdcache.cache.upgrade import upgrade
from kdcache.errors import CacheLocked

COMPAT = Path(__file__).parent / "fixtures" / "compat"


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(params=["pre-layout/topk", "pre-preprocess/extra-views", "pre-precision/dense-features"])
def old(tmp_path, request) -> Path:
    """An old cache where precompute put it: ROOT/<its cache id>."""
    stored = json.loads((COMPAT / request.param / "zarr.json").read_text())["attributes"]["kdcache"]
    dst = tmp_path / "root" / stored["cache_id"]
    shutil.copytree(COMPAT / request.param, dst)
    return dst


def test_upgrade_rewrites_only_the_manifest_and_takes_todays_id(old, capsys):
    before = files(old)
    stored = json.loads((old / "zarr.json").read_text())["attributes"]["kdcache"]
    code, out, _ = run_cli(["upgrade", str(old)], capsys)
    assert code == 0 and f"format 1 -> {FORMAT_VERSION}" in out and "reads now refuse a missing one" in out
    after = files(old)
    assert {k for k in before if before[k] != after.get(k)} == {"zarr.json"} and set(after) == set(before)
    cache = open_cache(str(old))
    assert cache.stored_format == FORMAT_VERSION and cache.check_chunks
    assert cache.id == cache_id(normalise(stored)) != stored["cache_id"]
    assert cache.manifest["history"][-1] == cache.manifest["history"][-1] | {
        "format": [1, FORMAT_VERSION], "previous_id": stored["cache_id"], "cache_id": cache.id}
    assert open_cache(str(old.parent / cache.id)).path == str(old)  # ROOT/<new id> names the folder
    code, out, _ = run_cli(["verify", str(old)], capsys)
    assert code == 0 and "intact" in out


def test_upgrading_again_changes_nothing(old, capsys):
    upgrade(str(old))
    before = files(old)
    code, out, _ = run_cli(["upgrade", str(old)], capsys)
    assert code == 0 and f"already format {FORMAT_VERSION}" in out
    assert files(old) == before


def test_a_missing_chunk_object_keeps_reads_lenient_and_is_counted(old, capsys):
    chunk = next(p for p in sorted((old / "energy" / "c").rglob("*")) if p.is_file())
    os.remove(chunk)
    code, out, _ = run_cli(["upgrade", str(old)], capsys)
    assert code == 0 and "1 chunk objects are absent" in out
    assert not open_cache(str(old)).check_chunks


def test_a_failed_write_leaves_the_old_cache_as_it_was_and_a_rerun_finishes(old, monkeypatch):
    before = files(old)

    def crash(self, manifest):
        raise OSError("disk gone")

    monkeypatch.setattr(CacheWriter, "save_manifest", crash)
    with pytest.raises(OSError):
        upgrade(str(old))
    assert files(old) == before and open_cache(str(old)).stored_format == 1
    monkeypatch.undo()
    assert upgrade(str(old)).changed


def test_upgrade_waits_for_no_one_a_live_writer_holds_the_cache(old, capsys):
    with WriterLock(str(old)):
        with pytest.raises(CacheLocked):
            upgrade(str(old))
        code, _, err = run_cli(["upgrade", str(old)], capsys)
    assert code == 2 and err.startswith("Error: ") and err.count("\n") == 1
    assert open_cache(str(old)).stored_format == 1


def test_upgrade_of_something_that_is_no_cache_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["upgrade", str(tmp_path / "nothing")], capsys)
    assert code == 2 and err.startswith("Error: no cache at") and err.count("\n") == 1
