"""Hugging Face datasets as a source (``hfds:``): a save_to_disk folder or a dataset in the local HF cache,
offline; columns and class names from its features; refusals in one line."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tests_support import run_cli

from kdcache.data import open_source
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData

datasets = pytest.importorskip("datasets")
FEATURES = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["ant", "bee", "cat"])})


def images(n: int, seed: int, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 30)), int(rng.integers(20, 30))) + ((3,) if mode == "RGB" else ())
    return [Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode) for _ in range(n)]


def dataset_dict(train: int = 12, val: int = 3, mode: str = "RGB", labels=None):
    def split(n: int, seed: int):
        return datasets.Dataset.from_dict({"img": images(n, seed, mode),
                                           "fine": (labels or [i % 3 for i in range(train)])[:n]},
                                          features=FEATURES)
    return datasets.DatasetDict({"train": split(train, 0), "validation": split(val, 1)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "pets"
    dataset_dict().save_to_disk(str(path))
    return path


def test_a_saved_dataset_dict_gives_both_splits_its_classes_and_pixels(saved):
    source = open_source(f"hfds:{saved}")
    assert (len(source.train), len(source.test), source.classes) == (12, 3, ("ant", "bee", "cat"))
    assert source.channels == 3 and source.train.labels.tolist() == [i % 3 for i in range(12)]
    stored = datasets.load_from_disk(str(saved))["train"][4]["img"]
    assert torch.equal(source.train[4][0], torch.from_numpy(np.array(stored.convert("RGB"))).permute(2, 0, 1))
    assert open_source(f"hfds:{saved}").fingerprint == source.fingerprint


def test_gray_images_give_one_channel(tmp_path):
    dataset_dict(mode="L").save_to_disk(str(tmp_path / "gray"))
    source = open_source(f"hfds:{tmp_path / 'gray'}")
    assert source.channels == 1 and source.train[0][0].shape[0] == 1


def test_other_labels_give_another_fingerprint(saved, tmp_path):
    dataset_dict(labels=[(i + 1) % 3 for i in range(12)]).save_to_disk(str(tmp_path / "relabelled"))
    assert open_source(f"hfds:{tmp_path / 'relabelled'}").fingerprint != open_source(f"hfds:{saved}").fingerprint


def test_a_dataset_in_the_local_cache_opens_offline(tmp_path, monkeypatch):
    """A folder of parquet files goes through datasets.load_dataset into the HF cache, with no network."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "parquet"
    for name, ds in dataset_dict().items():
        (data / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(data / "data" / f"{name}-00000-of-00001.parquet"))
    source = open_source(f"hfds:{data}")
    assert (len(source.train), len(source.test), source.classes) == (12, 3, ("ant", "bee", "cat"))


def test_precompute_train_and_eval_from_a_saved_dataset(saved, tmp_path, capsys):
    from kdcache import models

    torch.manual_seed(0)
    torch.save(models.create_model("cnn", 3, 3).state_dict(), tmp_path / "t.pt")
    code, out, err = run_cli(["precompute", "--dataset", f"hfds:{saved}", "--teacher", "cnn", "--weights",
                              str(tmp_path / "t.pt"), "--views", "2", "--out", str(tmp_path / "c"), "--device", "cpu",
                              "--quiet", "--teacher-size", "24"], capsys)
    assert code == 0, err
    cache = out.split(" written to ")[1].split(":")[0]
    code, _, err = run_cli(["train", "--dataset", f"hfds:{saved}:train", "--model", "cnn", "--cache", cache,
                            "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", "--dataset", f"hfds:{saved}", "--model", "cnn", "--weights",
                              str(tmp_path / "r" / "model.pt"), "--split", "val", "--size", "24"], capsys)
    assert code == 0 and "top-1" in out, err


def test_refusals_are_one_line(saved, tmp_path):
    with pytest.raises(MissingData, match="no split 'training'"):
        open_source(f"hfds:{saved}:training")
    datasets.DatasetDict({"train": dataset_dict()["train"]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(MissingData, match="no validation or test split"):
        open_source(f"hfds:{tmp_path / 'one'}")
    with pytest.raises(InvalidSpec, match=r"no image column 'picture'.*\?image=COLUMN"):
        open_source(f"hfds:{saved}?image=picture")
    with pytest.raises(MissingData, match="no Hugging Face dataset at"):
        open_source(f"hfds:{tmp_path / 'nothing'}")


def test_a_row_without_label_or_with_a_broken_image_is_named(tmp_path):
    plain = datasets.Features({"img": datasets.Image(decode=False), "fine": datasets.ClassLabel(names=["a", "b"])})
    good = io.BytesIO()
    images(1, 0)[0].save(good, "PNG")
    rows = {"img": [{"bytes": good.getvalue(), "path": None}] * 3, "fine": [0, None, 1]}
    split = datasets.Dataset.from_dict(rows, features=plain)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(DataCorrupt, match="row 1 has no class label"):
        open_source(f"hfds:{tmp_path / 'unlabelled'}")
    rows = {"img": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"garbage", "path": None}], "fine": [0, 1]}
    split = datasets.Dataset.from_dict(rows, features=plain)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "broken"))
    source = open_source(f"hfds:{tmp_path / 'broken'}")
    with pytest.raises(DataCorrupt, match=r"broken:train: the image of row 1 does not decode"):
        source.train[1]


def test_train_refuses_a_cache_made_from_another_hf_dataset(saved, tmp_path, capsys):
    from kdcache import models

    torch.manual_seed(0)
    torch.save(models.create_model("cnn", 3, 3).state_dict(), tmp_path / "t.pt")
    code, out, err = run_cli(["precompute", "--dataset", f"hfds:{saved}", "--teacher", "cnn", "--weights",
                              str(tmp_path / "t.pt"), "--views", "1", "--out", str(tmp_path / "c"), "--device", "cpu",
                              "--quiet"], capsys)
    assert code == 0, err
    cache = out.split(" written to ")[1].split(":")[0]
    dataset_dict(labels=[(i + 2) % 3 for i in range(12)]).save_to_disk(str(tmp_path / "other"))
    capsys.readouterr()  # the datasets package's own progress bars
    code, _, err = run_cli(["train", "--dataset", f"hfds:{tmp_path / 'other'}", "--model", "cnn", "--cache", cache,
                            "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and f"was made from dataset hfds:{saved}" in err
    assert not (tmp_path / "r").exists()
