"""The one claim of every cache writer (kdcache/cache/claim.py): precompute, import and extend take the same
options (--wait, --break-lock, --rebuild), refuse a held cache in the same line, and repair the same damage."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from interop_sources import make_folder, write_mldr
from test_lock import hold_in_subprocess
from tests_support import forge_stale_lock, run_cli

from kdcache.cache.claim import ClaimOptions, claim, is_whole
from kdcache.cache.integrity import verify
from kdcache.cache.lock import WriterLock
from kdcache.cache.store import open_cache
from kdcache.errors import CacheLocked
from kdcache.interop.imports import import_cache


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("claim")
    folder = make_folder(root / "pets", per_class=3)
    write_mldr(folder, root / "mldr", views=2)
    return str(root / "mldr"), f"imagefolder:{folder}"


def _chunk(path: str, array: str) -> Path:
    return next(p for p in sorted((Path(path) / array / "c").rglob("*")) if p.is_file())


def _imported(source, out: Path, **options) -> str:
    src, dataset = source
    return import_cache("ml-dr", src, dataset, str(out), progress=False, options=ClaimOptions(**options)).path


def test_an_import_held_by_another_writer_is_refused_like_a_precompute(source, tmp_path, capsys):
    path = _imported(source, tmp_path / "a")
    _chunk(path, "topk/values").unlink()
    assert not is_whole(path)
    with WriterLock(path):
        code, _, err = run_cli(["import", "ml-dr", source[0], "--dataset", source[1], "--out", str(tmp_path / "a"),
                                "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is being written by" in err and "--wait" in err


def test_an_import_waits_for_the_writer_with_wait(source, tmp_path):
    path = _imported(source, tmp_path / "w")
    _chunk(path, "topk/values").unlink()  # damaged: the rerun must take the lock to repair it
    lock = WriterLock(path).acquire()
    threading.Timer(0.5, lock.release).start()
    began = time.perf_counter()
    again = _imported(source, tmp_path / "w", wait=True)
    assert time.perf_counter() - began >= 0.4 and verify(again).ok


def test_a_rerun_repairs_a_complete_import_that_lost_a_chunk(source, tmp_path):
    path = _imported(source, tmp_path / "r")
    before = {p.relative_to(path): p.read_bytes() for p in Path(path).rglob("c/*") if p.is_file()}
    _chunk(path, "aug/rrc").unlink()
    assert not verify(path).ok
    _imported(source, tmp_path / "r")
    after = {p.relative_to(path): p.read_bytes() for p in Path(path).rglob("c/*") if p.is_file()}
    assert verify(path).ok and after == before


def test_rebuild_writes_an_import_anew(source, tmp_path):
    path = _imported(source, tmp_path / "b")
    marker = Path(path) / "stray-file"
    marker.write_text("left by someone")
    again = _imported(source, tmp_path / "b", rebuild=True)
    assert again == path and not marker.exists() and verify(path).ok


def test_break_lock_takes_over_a_hung_writers_import(source, tmp_path):
    path = _imported(source, tmp_path / "k")
    _chunk(path, "topk/indices").unlink()
    proc = hold_in_subprocess(path, heartbeat=3600)  # alive, holding the lock, never beating again
    try:
        forge_stale_lock(path)
        with pytest.raises(CacheLocked):
            _imported(source, tmp_path / "k")
        assert verify(_imported(source, tmp_path / "k", break_lock=True)).ok
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_claim_reuses_a_whole_cache_without_a_lock(source, tmp_path):
    path = _imported(source, tmp_path / "u")
    cache = open_cache(path)
    with WriterLock(path):  # another writer may hold it: a whole cache is read, not written
        held = claim(str(tmp_path / "u"), cache.manifest, cache.labels(), cache.array_specs())
    assert held.reused and held.lock is None
