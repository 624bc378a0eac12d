"""kdcache import fkd: FKD's per-image soft labels (written by tests/fkd_sources.py, FKD's rules) come in as a
cache whose views are the crops its teacher saw and whose targets are its stored probabilities; what cannot be
exact (float16 crops on large images, SRe2L's and RDED's layouts) is refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fkd_sources import write_fkd
from PIL import Image
from tests_support import pillow_before_13, run_cli

from kdcache import data
from kdcache.augment import Recipe
from kdcache.cache.store import open_cache
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.interop.imported import folder_order
from kdcache.interop.imports import import_cache


@pytest.fixture(scope="module", autouse=True)
def _sources_pillow():
    """The sources were rendered under Pillow 9.5-12.2's resize order, which imports replay by default."""
    with pillow_before_13():
        yield

SIZE = 24
CLASSES = 10


def make_folder(root: Path, names: dict[str, list[tuple[int, int]]] | None = None) -> Path:
    """An ImageFolder of CLASSES classes, two PNGs of different sizes each (``names``: class -> extra files)."""
    rng = np.random.RandomState(5)
    for split in ("train", "val"):
        for c in range(CLASSES):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
            for i in range(2 if split == "train" else 1):
                h, w = rng.randint(20, 70), rng.randint(20, 70)
                Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / f"n{c:08d}" / f"n{c:08d}_{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("fkd") / "imagenet")


def spec(folder: Path) -> str:
    return f"imagefolder:{folder}"


def config(path: Path, **settings) -> str:
    path.write_text("".join(f"{k}: {v}\n" for k, v in {"input_size": SIZE, **settings}.items()))
    return str(path)


def replay(cache, source, i: int, v: int) -> torch.Tensor:
    recipe = Recipe.from_manifest(cache.manifest["recipe"]["augment"])
    row = {k: x[0] for k, x in cache.aug_params(np.array([i]), np.array([v])).items()}
    return recipe.apply(source.train[i][0], row, SIZE, interpolation=cache.manifest["recipe"]["interpolation"])


@pytest.mark.parametrize("label_type, fp16", [("marginal_smoothing_k5", False), ("marginal_smoothing_k5", True),
                                              ("marginal_smoothing_k10", False), ("smoothing", False), ("hard", False),
                                              ("hard", True)])
def test_views_are_the_teachers_crops_and_targets_its_probabilities(folder, tmp_path, label_type, fp16):
    written = write_fkd(folder, tmp_path / "labels", label_type=label_type, fp16=fp16, size=SIZE)
    result = import_cache("fkd", str(tmp_path / "labels"), spec(folder), str(tmp_path / "out"),
                          config=config(tmp_path / "c.yaml", label_type=label_type), progress=False)
    cache, source = open_cache(result.path), data.open_source(spec(folder))
    order = folder_order(source)
    assert cache.views == 3 and cache.manifest["recipe"]["interpolation"] == "bicubic"
    assert cache.manifest["outputs"]["logits"]["k"] == {"hard": 1, "smoothing": 1}.get(label_type, int(label_type[-1:]) if
                                                                                        label_type.endswith("5") else 10)
    for (t, v), (theirs, label) in written.items():
        i = int(order[t])
        assert torch.equal((replay(cache, source, i, v) * 255).round(), (theirs * 255).round()), (t, v)
        ids = cache.read_views("topk/indices", np.array([i]), np.array([v]))[0]
        probs = np.exp(cache.read_views("topk/values", np.array([i]), np.array([v]))[0].astype(np.float64))
        if label_type == "hard":
            assert ids.tolist() == [int(label)] and np.allclose(probs, 1.0)
        else:
            row = np.asarray(label, dtype=np.float64).reshape(2, -1)
            assert ids.tolist() == row[0].astype(int).tolist()
            assert np.allclose(probs, row[1], rtol=1e-6)


def test_the_trainers_folder_level_and_the_cli_read_the_same(folder, tmp_path, capsys):
    """``--softlabel_path`` (one level below the generator's ``--save_path``) is accepted too; without
    ``--source-config`` the generator's defaults are taken, with a note."""
    write_fkd(folder, tmp_path / "labels", size=475 // 19)
    code, out, err = run_cli(["import", "fkd", str(tmp_path / "labels" / folder.name), "--dataset", spec(folder),
                              "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0 and "note: no --source-config: taking generate_soft_label.py's defaults" in err, err
    cache = open_cache(out.split(" written to ")[1].split(":")[0])
    assert cache.manifest["recipe"]["input_size"] == 475 and cache.manifest["imported"]["format"] == "fkd"


def test_float16_crops_that_name_several_pixels_are_refused(tmp_path):
    """Above about 2,048 px a float16 fraction names more than one pixel: the teacher's crop is lost."""
    root = make_folder(tmp_path / "imagenet")
    big = root / "train" / "n00000000" / "n00000000_9.png"
    Image.fromarray(np.zeros((3000, 3000, 3), np.uint8)).save(big)
    write_fkd(root, tmp_path / "labels", fp16=True, size=SIZE, scale=(0.5, 0.9))
    with pytest.raises(DataCorrupt, match=r"n00000000_9\.tar crop \d: the float16 crop fraction .* of a 3000x3000 image"):
        import_cache("fkd", str(tmp_path / "labels"), spec(root), str(tmp_path / "out"),
                     config=config(tmp_path / "c.yaml"), progress=False)


def test_two_images_that_share_a_label_file_are_refused(tmp_path):
    root = make_folder(tmp_path / "imagenet")
    for name in ("x.1.png", "x.2.png"):
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "train" / "n00000001" / name)
    write_fkd(root, tmp_path / "labels", size=SIZE)
    with pytest.raises(InvalidSpec, match=r"x\.1\.png and .*x\.2\.png share the label file .*x\.tar"):
        import_cache("fkd", str(tmp_path / "labels"), spec(root), str(tmp_path / "out"),
                     config=config(tmp_path / "c.yaml"), progress=False)


def test_missing_damaged_and_foreign_files_are_named(folder, tmp_path):
    write_fkd(folder, tmp_path / "labels", size=SIZE)
    victim = next((tmp_path / "labels").rglob("*.tar"))
    victim.write_bytes(b"not a pickle")
    with pytest.raises(DataCorrupt, match=victim.name):
        import_cache("fkd", str(tmp_path / "labels"), spec(folder), str(tmp_path / "out"),
                     config=config(tmp_path / "c.yaml"), progress=False)
    victim.unlink()
    with pytest.raises(MissingData, match=rf"{victim.name} is missing"):
        import_cache("fkd", str(tmp_path / "labels"), spec(folder), str(tmp_path / "out2"),
                     config=config(tmp_path / "c.yaml"), progress=False)
    with pytest.raises(DataCorrupt, match="labels of shape"):
        write_fkd(folder, tmp_path / "k10", size=SIZE, label_type="marginal_smoothing_k10")
        import_cache("fkd", str(tmp_path / "k10"), spec(folder), str(tmp_path / "out3"),
                     config=config(tmp_path / "c.yaml"), progress=False)  # the config says k5


@pytest.mark.parametrize("marker, message", [("epoch_0", "SRe2L's relabel files .* name no image"),
                                             ("syn_data", "RDED writes no soft labels")])
def test_sre2l_and_rded_layouts_are_refused_with_the_reason(folder, tmp_path, capsys, marker, message):
    (tmp_path / "src" / marker).mkdir(parents=True)
    code, _, err = run_cli(["import", "fkd", str(tmp_path / "src"), "--dataset", spec(folder), "--out",
                            str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_cache_imported_from_fkd_trains(folder, tmp_path):
    from kdcache.student.config import TrainConfig
    from kdcache.student.train import train

    write_fkd(folder, tmp_path / "labels", size=SIZE)
    path = import_cache("fkd", str(tmp_path / "labels"), spec(folder), str(tmp_path / "out"),
                        config=config(tmp_path / "c.yaml"), progress=False).path
    result = train(TrainConfig(dataset=spec(folder), model="cnn", out=str(tmp_path / "run"), cache=path, loss="kd",
                               epochs=1, batch_size=8, progress=False))
    assert result.final and all(np.isfinite(v) for v in result.final.values() if isinstance(v, float))
    shutil.rmtree(tmp_path / "run")


def test_images_one_folder_deeper_follow_the_generators_file_rule(tmp_path):
    """generate_soft_label.py names a file after the image path's last four parts: for
    ``train/<class>/<sub>/x.png`` that is ``train/<class>/<sub>/x.tar`` under --save_path, without the data folder."""
    root = make_folder(tmp_path / "imagenet")
    (root / "train" / "n00000002" / "extra").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "train" / "n00000002" / "extra" / "deep.png")
    write_fkd(root, tmp_path / "labels", size=SIZE)
    assert (tmp_path / "labels" / "train" / "n00000002" / "extra" / "deep.tar").is_file()
    path = import_cache("fkd", str(tmp_path / "labels"), spec(root), str(tmp_path / "out"),
                        config=config(tmp_path / "c.yaml"), progress=False).path
    assert open_cache(path).num_samples == 2 * CLASSES + 1


def test_a_source_keeping_more_classes_than_the_dataset_has_is_named(tmp_path):
    from source_folder import make_folder as three_classes

    root = three_classes(tmp_path / "pets")
    write_fkd(root, tmp_path / "labels", size=SIZE)  # top-5 of a 10-class teacher
    with pytest.raises(InvalidSpec, match="keeps the top 5 of its teacher's classes, the dataset has 3 — pass the "
                                          "--dataset"):
        import_cache("fkd", str(tmp_path / "labels"), spec(root), str(tmp_path / "out"),
                     config=config(tmp_path / "c.yaml"), progress=False)


@pytest.mark.parametrize("settings, says", [({"min_scale_crops": "a"}, "min_scale_crops 'a' is not a positive number"),
                                            ({"temp": "null"}, "temp None is not a positive number"),
                                            ({"mean": 0.5}, "mean 0.5 is not a list of 3 numbers")])
def test_source_config_values_that_are_not_numbers_are_refused(folder, tmp_path, settings, says):
    write_fkd(folder, tmp_path / "labels", size=SIZE)
    with pytest.raises(InvalidSpec, match=says):
        import_cache("fkd", str(tmp_path / "labels"), spec(folder), str(tmp_path / "out"),
                     config=config(tmp_path / "c.yaml", **settings), progress=False)


def _edit_first_file(root: Path, edit) -> None:
    victim = sorted(root.rglob("*.tar"))[0]
    coords, flip, labels = torch.load(victim, weights_only=False)
    torch.save(list(edit(coords.copy(), flip.copy(), labels.copy())), victim)


@pytest.mark.parametrize("edit, says", [
    (lambda c, f, lab: (np.where(np.arange(c.size).reshape(c.shape) == 0, np.nan, c).astype(c.dtype), f, lab),
     r"the crop fraction nan is not in \[0, 1\]"),
    (lambda c, f, lab: (np.where(np.arange(c.size).reshape(c.shape) == 1, np.inf, c).astype(c.dtype), f, lab),
     r"the crop fraction inf is not in \[0, 1\]"),
    (lambda c, f, lab: (np.where(np.arange(c.size).reshape(c.shape) == 2, 0, c).astype(c.dtype), f, lab),
     r"a crop \d+x0 at \(\d+, \d+\) lies outside its image of \d+x\d+ px"),
    (lambda c, f, lab: (c.astype(np.int64), f, lab), "the crops are int64, not the float fractions FKD stores"),
    (lambda c, f, lab: (c, f, lab.astype(str).astype(object)), "the labels are object, not numbers"),
    (lambda c, f, lab: (c, f, np.where(np.arange(lab.size).reshape(lab.shape) == 0, np.inf, lab)),
     "the class ids are not whole numbers"),
])
def test_damaged_crops_and_labels_are_one_line_naming_the_file(folder, tmp_path, edit, says):
    """NaN, infinite and empty crops, crops and labels of other types: each crashed the import before
    (red-team 2026-12-07), the empty crop inside the very message meant to name it."""
    write_fkd(folder, tmp_path / "labels", size=SIZE)
    _edit_first_file(tmp_path / "labels", edit)
    with pytest.raises(DataCorrupt, match=says):
        import_cache("fkd", str(tmp_path / "labels"), spec(folder), str(tmp_path / "out"),
                     config=config(tmp_path / "c.yaml"), progress=False)


def test_source_configs_that_are_not_generate_soft_labels_arguments_are_refused(folder, tmp_path, capsys):
    write_fkd(folder, tmp_path / "labels", size=SIZE)
    (tmp_path / "foreign.yaml").write_text("root: x\nshell: /bin/sh\n")
    cases = [(str(tmp_path / "foreign.yaml"), "names none of arch, input_size"),
             (config(tmp_path / "c1.yaml", label_type=["a", "b"]), r"label_type \['a', 'b'\] is not one of"),
             (config(tmp_path / "c2.yaml", min_scale_crops=0.5, max_scale_crops=0.2), "are not an area range"),
             (str(tmp_path / "absent.yaml"), "absent.yaml does not exist"),
             (str(tmp_path), "is a folder")]
    for path, says in cases:
        code, _, err = run_cli(["import", "fkd", str(tmp_path / "labels"), "--dataset", spec(folder), "--out",
                                str(tmp_path / "out"), "--source-config", path], capsys)
        assert code == 2 and err.count("\n") == 1 and __import__("re").search(says, err), err
