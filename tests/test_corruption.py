"""Never train on a lie: a cache with one damaged chunk (deleted, one byte flipped, truncated), for every
kind of array, is refused by `train` in one line, named by `verify`, and mended by `verify --repair` plus
the same precompute command — or, when the listing alone shows it, by precompute itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests_support import precompute_config, run_cli

from kdcache.cache.integrity import repair, verify
from kdcache.cache.store import open_cache
from kdcache.errors import CacheCorrupt
from kdcache.teacher.precompute import precompute

# (build, array): each kind of stored array, in the cache whose logit mode stores it
TARGETS = [
    ("dense", "logits"), ("dense", "energy"), ("dense", "aug/rrc"), ("dense", "aug/flip"),
    ("dense", "features/layer1"), ("topk", "topk/values"), ("topk", "topk/indices"),
    ("sampled", "sampled/ids"), ("sampled", "sampled/counts"),
]
BUILDS = {"dense": {"features": ("layer1",)}, "topk": {"logits": "topk:3"}, "sampled": {"logits": "sampled:8"}}
DAMAGE = ["delete", "flip", "truncate"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_weights) -> dict[str, tuple[str, object]]:
    """One complete cache per logit mode: build name -> (path, its config)."""
    out = {}
    for build, settings in BUILDS.items():
        cfg = precompute_config(tmp_path_factory.mktemp(build), teacher_weights, views=2, **settings)
        out[build] = (precompute(cfg).path, cfg)
    return out


def _copy(built, build: str, tmp_path: Path):
    """A private copy of a built cache (and the config that makes it, aimed at the copy's root)."""
    path, cfg = built[build]
    root = tmp_path / "root"
    shutil.copytree(Path(path).parent, root)
    return str(root / Path(path).name), type(cfg)(**(vars(cfg) | {"out": str(root)}))


def _damage(path: str, key_prefix: str, how: str) -> str:
    """Damage the second chunk object under ``key_prefix``; returns its key."""
    files = sorted(p for p in (Path(path) / key_prefix).rglob("*") if p.is_file())
    target = files[min(1, len(files) - 1)]
    if how == "delete":
        target.unlink()
    elif how == "flip":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        target.write_bytes(bytes(raw))
    else:
        target.write_bytes(target.read_bytes()[: max(len(target.read_bytes()) // 2, 1)])
    return target.relative_to(path).as_posix()


def _train(path: str, tmp_path: Path, capsys) -> tuple[int, str]:
    code, _, err = run_cli(["train", "--dataset", "fake:64", "--model", "cnn", "--cache", path, "--out",
                            str(tmp_path / "run"), "--epochs", "2", "--quiet", "--device", "cpu"], capsys)  # 2 epochs: every view
    return code, err


def _read_all(path: str) -> None:
    """Every view of every sample through the public loader, with energies and features."""
    from kdcache import loader

    stream = loader(path, "fake:64", batch_size=16, energy=True, features=["layer1"])
    for epoch in range(2):
        stream.dataset.set_epoch(epoch)
        for _ in stream:
            pass


def _arrays(path: str) -> dict[str, np.ndarray]:
    cache = open_cache(path)
    return {name: cache.read_samples(name, 0, cache.num_samples) for name in cache.array_names}


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize(("build", "array"), TARGETS)
def test_a_damaged_chunk_is_refused_by_train_named_by_verify_and_mended(built, tmp_path, capsys, build, array,
                                                                        how):
    path, cfg = _copy(built, build, tmp_path)
    before = _arrays(path)
    key = _damage(path, f"{array}/c", how)

    if array in ("energy", "features/layer1") and how != "delete":  # kd training never reads these arrays:
        with pytest.raises(CacheCorrupt) as excinfo:  # a loop that does is refused at the damaged chunk
            _read_all(path)
        message = str(excinfo.value)
        assert "\n" not in message and array in message and "kdcache verify" in message
    else:
        code, err = _train(path, tmp_path, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("Error: ") and array in err and "kdcache verify" in err

    report = verify(path)
    assert any(p.array == array and p.chunk and p.chunk.startswith(key.rsplit("/", 1)[0]) for p in report.problems), \
        report.problems

    if how == "delete":  # the listing shows it: precompute rewrites that shard instead of reusing the cache
        again = precompute(cfg)
        assert not again.reused and again.views_computed > 0
    else:  # byte damage is found by reading: verify --repair reopens the shard, precompute rewrites it
        _, shards = repair(path)
        assert shards
        again = precompute(cfg)
        assert not again.reused
    assert verify(path).ok
    after = _arrays(path)
    assert all(np.array_equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_shard_flags_are_refused_and_named(built, tmp_path, capsys, how):
    path, cfg = _copy(built, "dense", tmp_path)
    _damage(path, "status/shards/c", how)
    code, err = _train(path, tmp_path, capsys)
    assert code == 2 and "status/shards" in err and len(err.strip().splitlines()) == 1, err
    assert any(p.array == "status/shards" for p in verify(path).problems)
    again = precompute(cfg)  # a cleared or unreadable flag: precompute rewrites the shard, or says how to rebuild
    assert not again.reused
    assert verify(path).ok


def test_deleted_status_array_is_named_and_precompute_says_to_rebuild(built, tmp_path, capsys):
    path, cfg = _copy(built, "dense", tmp_path)
    shutil.rmtree(Path(path) / "status")
    code, err = _train(path, tmp_path, capsys)
    assert code == 2 and "status/shards" in err, err
    assert any(p.array == "status/shards" for p in verify(path).problems)
    with pytest.raises(CacheCorrupt, match="--rebuild"):
        precompute(cfg)
    rebuilt = precompute(type(cfg)(**(vars(cfg) | {"rebuild": True})))
    assert not rebuilt.reused and verify(path).ok


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_damaged_manifest_is_named_and_precompute_says_to_rebuild(built, tmp_path, capsys, how):
    path, cfg = _copy(built, "dense", tmp_path)
    meta = Path(path) / "zarr.json"
    meta.write_text(meta.read_text()[:100] if how == "truncate" else "{not json")
    code, err = _train(path, tmp_path, capsys)
    assert code == 2 and "zarr.json" in err and "no cache at" not in err, err
    code, _, err = run_cli(["verify", path], capsys)
    assert code == 2 and "zarr.json" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CacheCorrupt, match="--rebuild"):
        precompute(cfg)
    assert not precompute(type(cfg)(**(vars(cfg) | {"rebuild": True}))).reused and verify(path).ok


def test_array_without_metadata_is_not_reused_and_train_refuses_in_one_line(built, tmp_path, capsys):
    path, cfg = _copy(built, "dense", tmp_path)
    (Path(path) / "logits" / "zarr.json").unlink()
    code, err = _train(path, tmp_path, capsys)
    assert code == 2 and "logits" in err and "KeyError" not in err, err
    with pytest.raises(CacheCorrupt, match="--rebuild"):
        precompute(cfg)


def test_a_group_without_manifest_is_an_interrupted_write_that_precompute_rebuilds(built, tmp_path, capsys):
    path, cfg = _copy(built, "dense", tmp_path)
    meta = Path(path) / "zarr.json"
    meta.write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    code, _, err = run_cli(["info", path], capsys)
    assert code == 2 and "interrupted" in err
    assert not precompute(cfg).reused and verify(path).ok


def test_verify_says_a_live_writer_is_writing_the_missing_shards(built, tmp_path):
    from kdcache.cache.integrity import reopen_shards
    from kdcache.cache.lock import WriterLock

    path, _ = _copy(built, "dense", tmp_path)
    reopen_shards(open_cache(path, mode="r+"), [0])
    with WriterLock(path):
        problems = verify(path).problems
    assert any("is writing them" in p.what and "wait for it" in p.what for p in problems), problems
    assert any("rerun the precompute command" in p.what for p in verify(path).problems)


def test_damage_found_inside_a_loader_worker_is_still_one_line(built, tmp_path, capsys):
    path, _ = _copy(built, "dense", tmp_path)
    _damage(path, "logits/c", "flip")
    code, _, err = run_cli(["train", "--dataset", "fake:64", "--model", "cnn", "--cache", path, "--out",
                            str(tmp_path / "run"), "--epochs", "2", "--quiet", "--device", "cpu", "--workers", "1"],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "logits" in err and "Traceback" not in err, err


# --- bound to their place and to their inputs (format 5) -------------------------------------------------------

@pytest.mark.parametrize(("build", "array"), [("topk", "topk/values"), ("topk", "topk/indices"), ("dense", "aug/flip")])
def test_a_chunk_swapped_with_another_views_passes_its_checksum_but_not_its_place(built, tmp_path, capsys, build,
                                                                                 array):
    path, _ = _copy(built, build, tmp_path)
    def chunk(view: int) -> Path:  # rows 0.. of one view: a file, or a folder of one (tail axes)
        place = Path(path) / array / "c" / "0" / str(view)
        return place if place.is_file() else next(p for p in place.rglob("*") if p.is_file())

    one, two = chunk(0), chunk(1)
    data = one.read_bytes(), two.read_bytes()
    one.write_bytes(data[1])
    two.write_bytes(data[0])
    report = verify(path)
    assert {p.chunk for p in report.problems} == {one.relative_to(path).as_posix(), two.relative_to(path).as_posix()}
    assert all("not the ones written there" in p.what for p in report.problems)
    code, err = _train(path, tmp_path, capsys)
    assert code == 2 and "holds values that are not the ones written there" in err and err.count("\n") == 1


def _jpeg_cache(tmp_path: Path, teacher_weights) -> tuple[Path, str]:
    from zoo_support import jpeg_folder

    folder = jpeg_folder(tmp_path / "pets", classes=2, train=4, val=1, sides=(40, 60))
    torch.save(__import__("kdcache").models.create_model("cnn", 2, 3).state_dict(), tmp_path / "t.pt")
    cfg = precompute_config(tmp_path / "caches", str(tmp_path / "t.pt"), dataset=f"imagefolder:{folder}", views=2,
                            chunk_samples=4)
    return folder, precompute(cfg).path


def test_a_changed_source_image_is_refused_by_every_reader_naming_it(tmp_path, teacher_weights, capsys):
    from kdcache import loader
    from kdcache.audit import recompute
    from kdcache.errors import DataCorrupt
    from kdcache.teacher.extend import extend

    folder, path = _jpeg_cache(tmp_path, teacher_weights)
    assert open_cache(path).binds_inputs
    victim = sorted((folder / "train").rglob("*.jpg"))[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of the entropy-coded data: it still decodes, to other pixels
    victim.write_bytes(bytes(raw))
    dataset = f"imagefolder:{folder}"
    code, _, err = run_cli(["train", "--dataset", dataset, "--model", "cnn", "--cache", path, "--epochs", "2",
                            "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 2 and victim.name in err and "is not the image cache" in err and err.count("\n") == 1, err
    for reader in (lambda: [b for b in loader(path, dataset, batch_size=2)],
                   lambda: extend(path, views=3, weights=[str(tmp_path / "t.pt")], progress=False),
                   lambda: recompute(path, 16, weights=[str(tmp_path / "t.pt")])):  # every pair
        with pytest.raises(DataCorrupt, match=f"{victim.name} is not the image cache"):
            reader()


def test_a_cache_made_before_format_5_says_it_binds_neither(tmp_path, capsys):
    compat = Path(__file__).parent / "fixtures" / "compat" / "format-4-last" / "topk"
    code, out, _ = run_cli(["info", str(compat), "--quick"], capsys)
    assert code == 0 and "chunks NOT bound" in out and "inputs NOT bound" in out
    assert not open_cache(str(compat)).binds_inputs and not open_cache(str(compat)).binds_chunks


def test_a_shard_rewritten_with_its_size_and_time_restored_is_indexed_again(tmp_path, monkeypatch):
    import io
    import os
    import tarfile

    from kdcache.data import open_source

    monkeypatch.setenv("KDCACHE_INDEX_DIR", str(tmp_path / "index"))
    png = io.BytesIO()
    __import__("PIL.Image").Image.new("RGB", (8, 8)).save(png, "PNG")

    def write(label: bytes) -> None:
        for split in ("train", "val"):
            with tarfile.open(tmp_path / f"{split}-0.tar", "w") as tar:
                for name, data in (("a.png", png.getvalue()), ("a.cls", label), ("b.png", png.getvalue()),
                                   ("b.cls", b"1")):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))

    write(b"0")
    spec = f"wds:{tmp_path}/train-{{0..0}}.tar"
    before = open_source(spec)
    stat = os.stat(tmp_path / "train-0.tar")
    write(b"1")  # the same size; its times set back
    os.utime(tmp_path / "train-0.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = open_source(spec)
    assert after.train.labels.tolist() == [1, 1] and after.fingerprint != before.fingerprint


# --- forged params: values no op writes, with their chunk digests recomputed ------------------------------------
#
# A shared cache is untrusted. Its chunk digests bind each chunk to its place, but whoever edits the values can
# recompute them (kdcache.cache.digests.chunk_digests); what the readers check then is that every stored param
# lies in its op's domain (Recipe.stored_problem). Before, these crashed, hung or trained silently (red-team of
# 2026-12-07, /work/upstream/REDTEAM_caches.md).

def _forge(path: str, field: str, edit) -> None:
    import zarr

    from kdcache.cache.digests import chunk_digests, digest_name

    name = f"aug/{field}"
    array = zarr.open_array(str(Path(path) / name), mode="r+")
    values = array[...]
    edit(values)
    array[...] = values
    digests = zarr.open_array(str(Path(path) / digest_name(name)), mode="r+")
    digests[...] = chunk_digests(np.asarray(values, array.dtype), array.chunks[0])


def _train32(path: str, tmp_path: Path, capsys) -> tuple[int, str, str]:
    return run_cli(["train", "--dataset", "fake:32", "--model", "cnn", "--cache", path, "--out", str(tmp_path / "run"),
                    "--epochs", "2", "--quiet", "--device", "cpu"], capsys)


@pytest.fixture(scope="module")
def mixing(tmp_path_factory, teacher_weights) -> str:
    cfg = precompute_config(tmp_path_factory.mktemp("mixing"), teacher_weights, views=2, dataset="fake:32",
                            augment="rrc+flip+erase:1+mixup:1:0.5+cutmix:1:0.5", logits="topk:3")
    return precompute(cfg).path


@pytest.mark.parametrize("field, edit, says", [
    ("cutmix_partner", lambda v: v.__setitem__((0, 0), 10**12), r"aug/cutmix_partner holds 1000000000000, outside"),
    ("mixup_partner", lambda v: v.__setitem__((0, 0), -5), r"aug/mixup_partner holds -5, outside \[-1, 31\]"),
    ("mixup_lam", lambda v: v.__setitem__((0, 0), np.nan), "aug/mixup_lam holds nan, not a finite number"),
    ("cutmix_lam", lambda v: v.__setitem__((0, 0), -3), r"aug/cutmix_lam holds -3.0, outside \[0, 1\]"),
    ("cutmix_box", lambda v: v.__setitem__((0, 0), (0, 0, 1e9, 1e9)), "aug/cutmix_box holds 1000000000.0, outside"),
    ("erase", lambda v: v.__setitem__((0, 0), (0.5, 0.5, 0.9, 0.1)), r"aug/erase \(x0 \+ w, y0 \+ h\) holds 1.39"),
    ("flip", lambda v: v.__setitem__((0, 0), 7), r"aug/flip holds 7, outside \[0, 1\]"),
])
def test_forged_params_are_refused_by_every_reader_in_one_line(mixing, tmp_path, capsys, field, edit, says):
    import re

    from kdcache.student.reader import loader

    root = tmp_path / "root"
    shutil.copytree(Path(mixing).parent, root)
    path = str(root / Path(mixing).name)
    _forge(path, field, edit)
    code, _, err = _train32(path, tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and re.search(says, err) and "no op writes that" in err, err
    with pytest.raises(CacheCorrupt, match=says):
        for _ in loader(path, dataset="fake:32", batch_size=8, workers=0):
            pass
    report = verify(path, params=True)
    assert any(p.array == "aug" and re.search(says, p.what) or p.array == f"aug/{field}" and "NaN" in p.what
               for p in report.problems), report.problems
    if field != "flip":
        return
    code, out, err = run_cli(["verify", path, "--params"], capsys)
    assert code == 1 and "no op writes that" in out + err
    assert run_cli(["verify", path], capsys)[0] == 0  # without --params: the chunks alone, intact


def test_a_chain_naming_two_partners_is_refused(mixing, tmp_path):
    from kdcache.augment import Recipe

    cache = open_cache(mixing)
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    params = cache.aug_params(np.arange(8), np.zeros(8, np.int64))
    both = (params["mixup_partner"] >= 0) & (params["cutmix_partner"] >= 0)
    assert both.any() and recipe.stored_problem(params, cache.num_samples) is None
    params["cutmix_partner"] = np.where(both, (params["mixup_partner"] + 1) % 32, params["cutmix_partner"])
    assert "name different partners" in recipe.stored_problem(params, cache.num_samples)
    params = cache.aug_params(np.arange(8), np.zeros(8, np.int64))
    params["cutmix_partner"] = params["cutmix_partner"].astype(np.float64)
    assert "aug/cutmix_partner is stored as float64 [], its op writes int64 []" in \
        recipe.stored_problem(params, cache.num_samples)


def test_extend_refuses_params_its_recipe_does_not_draw(mixing, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(Path(mixing).parent, root)
    path = str(root / Path(mixing).name)
    _forge(path, "flip", lambda v: v.__setitem__((0, 0), 1 - v[0, 0]))  # in range, but not what the seed drew
    code, _, err = run_cli(["extend", path, "--views", "3", "--quiet"], capsys)
    assert code == 2 and "holds params its recipe (" in err and "do not draw" in err and err.count("\n") == 1, err


def test_verify_recompute_reports_forged_params_without_rendering_them(mixing, tmp_path, capsys, teacher_weights):
    root = tmp_path / "root"
    shutil.copytree(Path(mixing).parent, root)
    path = str(root / Path(mixing).name)
    _forge(path, "cutmix_partner", lambda v: v.__setitem__(slice(None), 10**12))
    code, out, err = run_cli(["verify", path, "--recompute", "4", "--weights", teacher_weights], capsys)
    assert code == 1 and "aug/cutmix_partner holds 1000000000000" in out + err and "Traceback" not in err, out + err


def test_a_manifest_asking_for_huge_views_is_refused_before_any_is_rendered(mixing, tmp_path, capsys):
    import json

    root = tmp_path / "root"
    shutil.copytree(Path(mixing).parent, root)
    path = root / Path(mixing).name
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["kdcache"]["recipe"]["input_size"] = 100_000  # rendered 24 GB before the kernel killed it
    (path / "zarr.json").write_text(json.dumps(meta))
    code, _, err = _train32(str(path), tmp_path, capsys)
    assert code == 2 and "recipe.input_size" in err and err.count("\n") == 1, err


def test_export_refuses_edited_chunks_and_forged_params(mixing, tmp_path):
    import zarr

    from kdcache.interop.mldr_export import export

    root = tmp_path / "root"
    shutil.copytree(Path(mixing).parent, root)
    path = str(root / Path(mixing).name)
    lam = zarr.open_array(str(Path(path) / "aug/mixup_lam"), mode="r+")
    values = lam[...]
    values[0, 0] = 0.25
    lam[...] = values  # digests not recomputed: exported with exit 0 before
    with pytest.raises(CacheCorrupt, match="holds values that are not the ones written there"):
        export(path, str(tmp_path / "out1"), progress=False)
    _forge(path, "mixup_lam", lambda v: v.__setitem__((0, 0), np.nan))  # written into ml-dr's files before
    with pytest.raises(CacheCorrupt, match="aug/mixup_lam holds nan, not a finite number"):
        export(path, str(tmp_path / "out2"), progress=False)
