"""kdcache import / export: sources written by ml-dr's and TinyViT's rules (tests/interop_sources.py) come in
as caches whose replayed views equal the source readers' views and whose targets are the stored ones."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from interop_sources import (CLASSES, SIZE, make_folder, mldr_densify, mldr_pixels, tinyvit_config,
                             tinyvit_view, write_mldr, write_tinyvit)
from tests_support import pillow_before_13, run_cli

from kdcache import data
from kdcache.augment import Recipe
from kdcache.cache.logits import densify_tensors
from kdcache.cache.store import open_cache
from kdcache.errors import CacheMismatch, DataCorrupt, InvalidSpec, MissingData, UnsafeFile
from kdcache.interop import pickles
from kdcache.interop.imports import import_cache
from kdcache.interop.imported import folder_order
from kdcache.interop.mldr_export import export
from kdcache.student.config import TrainConfig
from kdcache.student.train import train


@pytest.fixture(scope="module", autouse=True)
def _sources_pillow():
    """The sources were rendered under Pillow 9.5-12.2's resize order, which imports replay by default."""
    with pillow_before_13():
        yield

LOGIT_LOSSES = ["kd", "dkd", "nkd", "dist", "cskd", "r2kd", "pld", "mixkd", "dr"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("interop") / "pets")


def spec(folder: Path) -> str:
    return f"imagefolder:{folder}"


def replay(cache, source, i: int, v: int, size: int) -> torch.Tensor:
    """kdcache's view (i, v) of ``cache``, as every replay renders it (Recipe.apply), before normalisation."""
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    row = {k: x[0] for k, x in cache.aug_params(np.array([i]), np.array([v])).items()}
    return recipe.apply(source.train[i][0], row, size, partner=lambda j: source.train[j][0],
                        interpolation=cache.manifest["recipe"]["interpolation"])


def same_pixels(ours: torch.Tensor, theirs: torch.Tensor, blended: bool) -> None:
    """Equal uint8 pixels (a blend is not on the uint8 grid: there within float32 rounding); ``theirs`` is a
    reader's view un-normalised, so both differ by the rounding of normalising and undoing it."""
    if not blended:
        assert torch.equal((ours * 255).round(), (theirs * 255).round())
    assert (ours - theirs).abs().max() <= 1e-6


def densified_as_kdcache(prob: tuple[list[float], list[int]], num_classes: int) -> torch.Tensor:
    """kdcache's target of ml-dr's top-k: the missing mass spread, or, where the float32 sum exceeds 1 (where
    ml-dr's densify takes the softmax of the probabilities instead), the probabilities renormalised."""
    sp = torch.tensor(prob[0])
    if 1.0 - sp.sum() >= 0.0:
        return mldr_densify(prob, num_classes)
    p = torch.zeros(num_classes)
    p[prob[1]] = sp / sp.sum()
    return p


# --- pickles ---------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["pickle", "torch", "joblib"])
def test_a_payload_file_fails_in_one_line_and_its_code_never_runs(tmp_path, container):
    marker = tmp_path / "ran"
    path = tmp_path / "0.pth.tar"
    obj = (0, [{"params": _Payload(marker), "prob": ([1.0], [0])}])
    if container == "pickle":
        path.write_bytes(pickle.dumps(obj))
    elif container == "torch":
        torch.save(obj, path, pickle_protocol=4)
    else:
        joblib.dump(obj, path, compress=True)
    with pytest.raises(UnsafeFile, match=r"asks to load posix\.system.*nothing of it was run") as err:
        pickles.load(path)
    assert "\n" not in str(err.value) and not marker.exists()


def test_the_cli_refuses_a_payload_config_and_runs_nothing(tmp_path, folder, capsys):
    marker = tmp_path / "ran"
    src = tmp_path / "bad"
    src.mkdir()
    torch.save({"reinforce": _Payload(marker)}, src / "config.pth.tar")
    code, out, err = run_cli(["import", "ml-dr", str(src), "--dataset", spec(folder), "--out", str(tmp_path / "o")],
                             capsys)
    assert code == 2 and err.startswith("Error: ") and err.count("\n") == 1 and "posix.system" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_plain_data_and_numpy_arrays_load_and_tensors_are_refused(tmp_path):
    obj = {"a": [1, 2.5, "x", None, (True, b"z")], "s": {1, 2}, "n": np.arange(4, dtype=np.int16),
           "f": np.float32(1.5)}
    for protocol in (2, 4):
        (tmp_path / "p").write_bytes(pickle.dumps(obj, protocol=protocol))
        got = pickles.load(tmp_path / "p")
        assert got["a"] == obj["a"] and got["s"] == obj["s"] and got["f"] == obj["f"]
        assert np.array_equal(got["n"], obj["n"]) and got["n"].dtype == np.int16
    torch.save({"t": torch.zeros(2)}, tmp_path / "t")
    with pytest.raises(UnsafeFile, match="holds torch tensors"):
        pickles.load(tmp_path / "t")


def test_a_truncated_pickle_is_damage_named_by_its_file(tmp_path):
    torch.save((0, [1, 2, 3] * 100), tmp_path / "0.pth.tar", pickle_protocol=4)
    data_ = (tmp_path / "0.pth.tar").read_bytes()
    (tmp_path / "0.pth.tar").write_bytes(data_[: len(data_) // 2])
    with pytest.raises(DataCorrupt, match=r"0\.pth\.tar is not a whole pickle"):
        pickles.load(tmp_path / "0.pth.tar")


# --- ml-dr -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mldr_caches(folder, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (ml-dr folder, imported cache path) for three kinds of reinforcement."""
    root = tmp_path_factory.mktemp("mldr")
    kinds = {"cropflip": (None, False, True), "mixup": ("mixup", True, True), "cutmix": ("cutmix", True, False)}
    out = {}
    for name, (mix, erase, compressed) in kinds.items():
        src = root / name
        write_mldr(folder, src, mix=mix, erase=erase, compressed=compressed, seed=len(out))
        out[name] = (src, import_cache("ml-dr", str(src), spec(folder), str(root / "caches"), progress=False).path)
    return out


@pytest.mark.parametrize("kind", ["cropflip", "mixup", "cutmix"])
def test_mldr_views_and_targets_are_those_its_reader_gives(folder, mldr_caches, kind):
    src, path = mldr_caches[kind]
    cache, source = open_cache(path), data.open_source(spec(folder))
    order = folder_order(source)
    mixed = 0
    for t in range(len(source.train)):
        i = int(order[t])
        for v in range(cache.views):
            theirs, entry = mldr_pixels(folder, src, t, v)
            same_pixels(replay(cache, source, i, v, SIZE), theirs, blended=kind == "mixup")
            block = {name: torch.from_numpy(cache.read_views(name, np.array([i]), np.array([v])))
                     for name in ("topk/values", "topk/indices")}
            ours = densify_tensors(cache.manifest["outputs"]["logits"], len(CLASSES), block)[0]
            assert torch.allclose(ours, densified_as_kdcache(entry["prob"], len(CLASSES)), rtol=1e-6, atol=1e-7)
            mixed += int(cache.aug_params(np.array([i]), np.array([v])).get(f"{kind}_partner", [-1])[0] >= 0)
    assert kind == "cropflip" or 0 < mixed < len(source.train) * cache.views
    m = cache.manifest
    assert m["imported"]["format"] == "ml-dr" and m["imported"]["version"] == 1
    assert m["teacher"]["members"][0]["spec"] == "imported:ml-dr"
    assert m["teacher"]["members"][0]["tag"] == "tiny-ensemble"
    assert m["recipe"]["augment"]["spec"].startswith("pilrrc") and m["recipe"]["mean"] == [0.5, 0.4, 0.3]


def test_top_k_values_keep_the_sources_float32_probabilities(folder, mldr_caches):
    """Stored as float32 log-probabilities: exp gives each float32 probability back within the rounding of its
    logarithm, 2**-24 * (1 + |ln p|) relative (docs/interop.md)."""
    src, path = mldr_caches["cropflip"]
    cache, order = open_cache(path), folder_order(data.open_source(spec(folder)))
    stored = torch.load(src / "4.pth.tar", weights_only=False)[1][0]["prob"]
    values = cache.read_views("topk/values", np.array([int(order[4])]), np.array([0]))[0]
    ids = cache.read_views("topk/indices", np.array([int(order[4])]), np.array([0]))[0]
    by_id = dict(zip(stored[1], np.float32(stored[0])))
    theirs = np.array([by_id[int(c)] for c in ids], dtype=np.float64)
    back = np.exp(values.astype(np.float64))
    assert (np.abs(back / theirs - 1) <= 2.0**-24 * (1 + np.abs(np.log(theirs))) + 2.0**-24).all()
    assert list(values) == sorted(values, reverse=True)


@pytest.mark.parametrize("loss", LOGIT_LOSSES)
def test_every_logit_loss_trains_an_epoch_from_an_imported_cache(folder, mldr_caches, tmp_path, loss):
    result = train(TrainConfig(dataset=spec(folder), model="cnn", out=str(tmp_path / loss), cache=mldr_caches["cutmix"][1],
                               loss=loss, epochs=1, batch_size=8, progress=False))
    assert result.final and all(np.isfinite(v) for v in result.final.values() if isinstance(v, float))


def test_energy_losses_and_teacher_runs_are_refused_in_one_line(folder, mldr_caches, tmp_path, capsys):
    path = mldr_caches["cropflip"][1]
    code, _, err = run_cli(["train", "--dataset", spec(folder), "--model", "cnn", "--cache", path, "--loss",
                            "energy_kd", "--epochs", "1", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and err.count("\n") == 1 and "energy" in err
    for argv in (["extend", path, "--views", "4"], ["verify", path, "--recompute", "2"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and "was imported from ml-dr: its teacher ran elsewhere" in err, argv


def test_info_and_verify_read_an_imported_cache(mldr_caches, capsys):
    path = mldr_caches["mixup"][1]
    code, out, _ = run_cli(["info", path], capsys)
    assert code == 0 and "imported:ml-dr" in out and "pilrrc:0.25:1:2+flip+erase:0.5+mixup" in out and "imported  from ml-dr" in out
    code, out, _ = run_cli(["verify", path], capsys)
    assert code == 0


def test_an_imported_manifest_holds_only_the_keys_of_the_current_version(mldr_caches, tinyvit):
    import json

    from kdcache.cache.formats import FORMAT_VERSION, KEYS, key_paths, normalise

    for path in [p for _, p in mldr_caches.values()] + [tinyvit[2]]:
        stored = json.loads((Path(path) / "zarr.json").read_text())["attributes"]["kdcache"]
        assert key_paths(stored) <= KEYS[FORMAT_VERSION] and "config" not in stored
        assert stored["format_version"] == FORMAT_VERSION and normalise(stored) == stored


def test_a_rerun_reuses_the_complete_import(folder, mldr_caches, tmp_path, capsys):
    src, path = mldr_caches["cropflip"]
    code, out, _ = run_cli(["import", "ml-dr", str(src), "--dataset", spec(folder), "--out", str(Path(path).parent),
                            "--quiet"], capsys)
    assert code == 0 and "already holds this import — reused" in out and open_cache(path).id in out


def _edit_config(src: Path, to: Path, change) -> Path:
    import shutil

    shutil.copytree(src, to)
    config = torch.load(to / "config.pth.tar", weights_only=False)
    change(config["reinforce"]["image_augmentation"])
    torch.save(config, to / "config.pth.tar")
    return to


@pytest.mark.parametrize("change, message", [
    (lambda aug: aug.update(center_crop={"size": 8}), "ml-dr's CenterCrop fails"),
    (lambda aug: aug.update(rand_augment={"num_ops": 2, "fill": 0}), "rand_augment with an interpolation or fill"),
    (lambda aug: aug.pop("random_resized_crop"), "kdcache views share one square size"),
])
def test_ops_without_an_exact_kdcache_op_are_refused(folder, mldr_caches, tmp_path, change, message):
    src = _edit_config(mldr_caches["mixup"][0], tmp_path / "src", change)
    with pytest.raises(InvalidSpec, match=message):
        import_cache("ml-dr", str(src), spec(folder), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_names_ml_dr_ignores_are_ignored_with_a_note(folder, mldr_caches, tmp_path, capsys):
    """ml-dr's compose_from_config skips a name it does not know (its Flowers-102 and Food-101 configs name
    ``random_resize_crop``), and ``enable: false`` drops an entry; the import does the same and says so."""
    def change(aug):
        aug["random_resize_crop"] = {"enable": True, "size": 224}
        aug["rand_augment"] = {"enable": False, "num_ops": 2}  # dropped, not refused
    src = _edit_config(mldr_caches["mixup"][0], tmp_path / "src", change)
    code, out, err = run_cli(["import", "ml-dr", str(src), "--dataset", spec(folder), "--out", str(tmp_path / "out")],
                             capsys)
    assert code == 0, err
    assert "note:" in err and "ml-dr ignores 'random_resize_crop'" in err
    cache = open_cache(out.split(" written to ")[1].split(":")[0])
    assert cache.manifest["recipe"]["augment"]["spec"] == open_cache(mldr_caches["mixup"][1]).manifest["recipe"][
        "augment"]["spec"]


def test_a_missing_or_damaged_sample_file_is_named(folder, mldr_caches, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(mldr_caches["cropflip"][0], src)
    (src / "7.pth.tar").unlink()
    with pytest.raises(MissingData, match=r"7\.pth\.tar is missing"):
        import_cache("ml-dr", str(src), spec(folder), str(tmp_path / "out"), progress=False)
    (src / "7.pth.tar").write_bytes(b"\x80\x04\x95")
    with pytest.raises(DataCorrupt, match=r"7\.pth\.tar is not a whole pickle"):
        import_cache("ml-dr", str(src), spec(folder), str(tmp_path / "out"), progress=False)
    out = open_cache(next(p for p in (tmp_path / "out").iterdir() if p.is_dir()), allow_incomplete=True)
    assert not out.complete  # nothing a later run would take for complete


def test_params_that_are_not_ml_drs_are_damage_named_by_file_and_view(folder, mldr_caches, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(mldr_caches["mixup"][0], src)
    index, entries = torch.load(src / "2.pth.tar", weights_only=False)
    entries[1]["params"] = entries[1]["params"][:2]  # a compressed list cut short
    torch.save((index, entries), src / "2.pth.tar", pickle_protocol=4)
    with pytest.raises(DataCorrupt, match=r"2\.pth\.tar view 1: its params are not ml-dr's"):
        import_cache("ml-dr", str(src), spec(folder), str(tmp_path / "out"), progress=False)


def test_a_joblib_file_reads_as_the_torch_one(mldr_caches, tmp_path):
    src = mldr_caches["cutmix"][0]
    obj = torch.load(src / "3.pth.tar", weights_only=False)
    joblib.dump(obj, tmp_path / "3.pth.tar", compress=True)
    assert pickles.load(tmp_path / "3.pth.tar") == pickles.load(src / "3.pth.tar")


# --- export ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cropflip", "mixup", "cutmix"])
def test_export_then_import_gives_the_same_arrays(folder, mldr_caches, tmp_path, kind):
    first = open_cache(mldr_caches[kind][1])
    result = export(first.path, str(tmp_path / "exported"), progress=False)
    assert result.exact and result.samples == first.num_samples
    again = open_cache(import_cache("ml-dr", str(tmp_path / "exported"), spec(folder), str(tmp_path / "out"),
                                    progress=False).path)
    for name in first.array_names:
        if name != "topk/values":
            assert np.array_equal(first.read_samples(name, 0, first.num_samples),
                                  again.read_samples(name, 0, again.num_samples)), name
    assert again.manifest["recipe"] == first.manifest["recipe"]
    # the values come back as the target they give: where top-k keeps every class (here), renormalised
    entry, n = first.manifest["outputs"]["logits"], first.num_samples
    targets = [densify_tensors(entry, len(CLASSES), {name: torch.from_numpy(c.read_samples(name, 0, n))
                                                     for name in ("topk/values", "topk/indices")})
               for c in (first, again)]
    assert torch.allclose(*targets, rtol=0, atol=1e-7)


@pytest.mark.parametrize("augment, exact, logits", [
    ("pilrrc:0.3+flip+cutmix:0.5", True, "topk:3"), ("pilrrc:0.3+flip+erase:0.5", True, "topk:2"),
    ("rrc:0.3+flip+mixup", False, "topk:2")])
def test_mldrs_reader_renders_an_exported_kdcache_cache(folder, tmp_path, augment, exact, logits):
    from kdcache import models
    from kdcache.teacher.config import PrecomputeConfig
    from kdcache.teacher.precompute import precompute

    torch.manual_seed(0)
    torch.save(models.create_model("cnn", 3, 3).state_dict(), tmp_path / "teacher.pt")
    made = precompute(PrecomputeConfig(dataset=spec(folder), teacher="cnn", weights=str(tmp_path / "teacher.pt"),
                                       out=str(tmp_path / "c"), views=2,
                                       augment=augment, logits=logits, teacher_size=32, batch_size=8, progress=False))
    result = export(made.path, str(tmp_path / "exported"), progress=False)
    assert result.exact == exact
    assert torch.load(tmp_path / "exported" / "0.pth.tar")[0] == 0  # torch's default weights_only load reads it
    cache, source = open_cache(made.path), data.open_source(spec(folder))
    order = folder_order(source)
    for t in range(len(source.train)):
        for v in range(2):
            theirs, entry = mldr_pixels(folder, tmp_path / "exported", t, v)
            ours = replay(cache, source, int(order[t]), v, 32)
            if exact:
                same_pixels(ours, theirs, blended=False)
            else:
                assert (ours - theirs).abs().max() <= 2.5 / 255
            block = {name: torch.from_numpy(cache.read_views(name, np.array([int(order[t])]), np.array([v])))
                     for name in ("topk/values", "topk/indices")}
            target = densify_tensors(cache.manifest["outputs"]["logits"], 3, block)[0]
            assert torch.allclose(mldr_densify(entry["prob"], 3), target, rtol=1e-6, atol=1e-7)  # ml-dr's own densify


def test_export_refuses_a_dense_cache(cache_path, tmp_path):
    with pytest.raises(CacheMismatch, match="ml-dr stores top-k probabilities"):
        export(cache_path, str(tmp_path / "x"), progress=False)


# --- TinyViT ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tinyvit(folder, tmp_path_factory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("tinyvit")
    saved = write_tinyvit(folder, root / "logits")
    config = tinyvit_config(root / "config.json")
    path = import_cache("tinyvit", str(root / "logits"), spec(folder), str(root / "caches"), config=str(config),
                        progress=False).path
    return root, saved, path


def test_tinyvit_views_and_targets_are_those_its_reader_gives(folder, tinyvit):
    _, saved, path = tinyvit
    cache, source = open_cache(path), data.open_source(spec(folder))
    order = folder_order(source)
    assert cache.views == 3 and cache.manifest["recipe"]["interpolation"] == "bicubic"
    for t in range(len(source.train)):
        i = int(order[t])
        values = cache.read_views("topk/values", np.full(3, i), np.arange(3))
        ids = cache.read_views("topk/indices", np.full(3, i), np.arange(3))
        for epoch in range(3):
            seed, their_ids, their_probs = saved[(t, epoch)]
            same_pixels(replay(cache, source, i, epoch, 40), tinyvit_view(folder, seed, t), blended=False)
            assert np.array_equal(ids[epoch], their_ids)
            back = np.exp(values[epoch].astype(np.float64)).astype(np.float16)
            assert np.array_equal(back.view(np.uint16), their_probs.view(np.uint16))  # the float16 bits come back
    assert cache.manifest["imported"]["model"] == "tiny_vit"
    assert cache.manifest["outputs"]["precision"] == "fp16"  # AMP_ENABLE true, TinyViT's default


def test_a_truncated_tinyvit_values_file_is_refused_by_name(folder, tinyvit, tmp_path):
    import shutil

    root, _, _ = tinyvit
    shutil.copytree(root / "logits", tmp_path / "logits")
    values = tmp_path / "logits" / "logits_top2_epoch1" / "rank1-values.bin"
    values.write_bytes(values.read_bytes()[:-3])
    with pytest.raises(DataCorrupt, match=r"rank1-values\.bin holds \d+ bytes, but rank1-keys\.txt lists \d+ keys"):
        import_cache("tinyvit", str(tmp_path / "logits"), spec(folder), str(tmp_path / "o"),
                     config=str(root / "config.json"), progress=False)


def test_the_tinyvit_index_spills_to_a_file_that_has_no_name(tmp_path, monkeypatch):
    """Every epoch's index is on disk (kdcache/interop/tinyvit_files.Spill), in a file that is unlinked from the
    start: nothing is left in TMPDIR however the import ends."""
    import tempfile

    from kdcache.interop.tinyvit_files import Spill

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spill = Spill(4, 1000, paired=True)
    assert isinstance(spill.entries, np.memmap) and spill.entries.shape == (4, 1000)
    spill.entries[2, 5] = (7, 8, 9)
    assert spill.entries[2, 5].tolist() == (7, 8, 9) and spill.entries[1, 5].tolist() == (0, 0, 0)
    assert spill.entries.nbytes == 4 * 1000 * 12  # 12 B per sample and epoch with mixing
    assert list(tmp_path.iterdir()) == []
    spill.close()
    assert spill.entries.size == 0


def test_an_import_gives_the_index_room_back_whether_it_ends_well_or_not(folder, tinyvit, tmp_path, monkeypatch):
    """Not when the garbage collector meets the last reference: two imports of ImageNet-22k in one process would
    need twice the room."""
    import shutil

    from kdcache.interop.tinyvit_files import Spill

    root, _, _ = tinyvit
    closed = []
    close = Spill.close
    monkeypatch.setattr(Spill, "close", lambda self: (closed.append(1), close(self)))
    import_cache("tinyvit", str(root / "logits"), spec(folder), str(tmp_path / "o"), config=str(root / "config.json"),
                 progress=False)
    assert closed == [1]
    shutil.copytree(root / "logits", tmp_path / "logits")
    (tmp_path / "logits" / "logits_top2_epoch2" / "rank0-values.bin").write_bytes(b"")
    with pytest.raises(DataCorrupt):
        import_cache("tinyvit", str(tmp_path / "logits"), spec(folder), str(tmp_path / "o2"),
                     config=str(root / "config.json"), progress=False)
    assert closed == [1, 1]


def test_a_tmpdir_without_room_for_the_tinyvit_index_is_one_line(tmp_path, monkeypatch):
    """The index's room is taken before it is written: a full disk under a memory map would kill the process."""
    import errno
    import os
    import tempfile

    from kdcache.interop.tinyvit_files import Spill

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(InvalidSpec, match=r"needs 457.8 MiB in .*No space left on device.* set TMPDIR to a folder"):
        Spill(300, 400_000, paired=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("changes", "precision"), [({"AMP_ENABLE": False}, "fp32"), ({"AMP_ENABLE": True}, "fp16")])
def test_tinyvit_precision_is_its_amp_enable(folder, tinyvit, tmp_path, changes, precision):
    root, _, _ = tinyvit
    config = tinyvit_config(tmp_path / "config.json", **changes)
    path = import_cache("tinyvit", str(root / "logits"), spec(folder), str(tmp_path / "o"), config=str(config),
                        progress=False).path
    assert open_cache(path).manifest["outputs"]["precision"] == precision


def test_an_older_tinyvit_config_says_its_precision_with_amp_opt_level(tmp_path):
    import yaml

    from kdcache.interop.tinyvit import teacher_precision

    assert teacher_precision(yaml.safe_load("AMP_OPT_LEVEL: O0\n")) == "fp32"
    assert teacher_precision(yaml.safe_load("AMP_OPT_LEVEL: O1\n")) == "fp16"
    assert teacher_precision({}) == "fp16"  # TinyViT's default: AMP on


@pytest.mark.parametrize("key, value, message", [
    ("AUG.AUTO_AUGMENT", "original", "kdcache replays TinyViT's RandAugment"),
    ("AUG.AUTO_AUGMENT", "rand-m9-x3", "RandAugment section 'x3' is not one TinyViT knows"),
    ("AUG.CUTMIX_MINMAX", [0.2, 0.8], "min-max boxes are not imported"),
    ("AUG.COLOR_JITTER", 0.4, "COLOR_JITTER without RandAugment"),
    ("DATA.INTERPOLATION", "random", "cannot save logits with a random one"),
    ("DATA.INTERPOLATION", "lanczos", "kdcache replays bilinear, bicubic or nearest"),
    ("DATA.MEAN_AND_STD_TYPE", "imagenet21k", "TinyViT would not run with it"),
])
def test_tinyvit_augmentations_without_an_exact_op_are_refused(folder, tinyvit, tmp_path, key, value, message):
    root, _, _ = tinyvit
    config = tinyvit_config(tmp_path / "config.json", **{key: value})
    with pytest.raises(InvalidSpec, match=message):
        import_cache("tinyvit", str(root / "logits"), spec(folder), str(tmp_path / "o"), config=str(config),
                     progress=False)


def test_tinyvit_needs_its_config_and_ml_dr_takes_none(folder, tinyvit, mldr_caches, tmp_path, capsys):
    root, _, _ = tinyvit
    code, _, err = run_cli(["import", "tinyvit", str(root / "logits"), "--dataset", spec(folder), "--out",
                            str(tmp_path / "o")], capsys)
    assert code == 2 and "needs --source-config" in err
    code, _, err = run_cli(["import", "ml-dr", str(mldr_caches["cropflip"][0]), "--dataset", spec(folder), "--out",
                            str(tmp_path / "o"), "--source-config", "x.json"], capsys)
    assert code == 2 and "drop it" in err
    code, _, err = run_cli(["import", "sre2l", "x", "--dataset", spec(folder), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is not one of ml-dr, tinyvit, fkd" in err
    code, _, err = run_cli(["import", "tinyvit", str(root / "logits"), "--dataset", spec(folder), "--out",
                            str(tmp_path / "o"), "--randaugment-on", "tensor"], capsys)
    assert code == 2 and "tinyvit has one — drop it" in err


def test_import_help_lists_the_formats(capsys):
    code, out, _ = run_cli(["import", "--help"], capsys)
    assert code == 0 and "ml-dr" in out and "tinyvit" in out
