"""WebDataset shards as a source (``wds:``): one scan gives every sample a stable index, the shards'
names and (key, size, label) lists are the fingerprint, a cache made from other shards is refused
naming the shard, and damaged shards are one line naming shard and key."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from tests_support import run_cli
from zoo_support import jpeg_folder

from kdcache.data import open_source
from kdcache.errors import DataCorrupt, InvalidSpec, MissingData
from kdcache.data.spec import expand_braces, parse
from kdcache.data.wds_writer import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """A generated ImageNet-shaped folder (3 classes x 6 train, 2 val, 40-70 px) and its shards, 5 per shard."""
    root = tmp_path_factory.mktemp("wds")
    folder = jpeg_folder(root / "folder", classes=3, train=6, val=2, sides=(40, 70))
    write_shards(open_source(f"imagefolder:{folder}"), str(root / "shards"), per_shard=5)
    return folder, root / "shards"


def spec(folder: Path) -> str:
    return f"wds:{folder}/train-{{000000..000003}}.tar"


def test_brace_patterns_expand_in_order_with_their_padding():
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{a,b}/x-{1..2}") == ["a/x-1", "a/x-2", "b/x-1", "b/x-2"]
    parsed = parse("wds:s3://b/train-{0..1}.tar?image=png;jpg&label=label&val=s3://b/v-{0..0}.tar")
    assert expand_braces(parsed.path) == ["s3://b/train-0.tar", "s3://b/train-1.tar"]
    assert expand_braces(parsed.option("val")) == ["s3://b/v-0.tar"]
    assert parsed.image_keys == ("png", "jpg") and parsed.label_key == "label"
    with pytest.raises(InvalidSpec, match="wds:PATTERN"):
        parse("wds:x.tar?colour=red")


def test_shards_give_the_folders_samples_in_shard_then_member_order(shards):
    folder, out = shards
    source, images = open_source(spec(out)), open_source(f"imagefolder:{folder}")
    assert len(source.train) == 18 and len(source.test) == 6 and source.num_classes == 3
    assert [p["samples"] for p in source.parts] == [5, 5, 5, 3]
    assert source.train.labels.tolist() == images.train.labels.tolist()
    for i in (0, 7, 17):
        assert torch.equal(source.train[i][0], images.train[i][0])
    assert source.image_size == images.image_size and source.channels == 3


def test_the_fingerprint_follows_the_shards_content_not_their_location(shards, tmp_path):
    _, out = shards
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    assert open_source(spec(moved)).fingerprint == open_source(spec(out)).fingerprint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from kdcache import models

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("t") / "cnn.pt"
    torch.save(models.create_model("cnn", 3, 3).state_dict(), path)
    return str(path)


def precompute(dataset: str, out: Path, teacher: str, capsys) -> str:
    code, stdout, err = run_cli(["precompute", "--dataset", dataset, "--teacher", "cnn", "--weights", teacher,
                                 "--views", "2", "--out", str(out), "--device", "cpu", "--quiet",
                                 "--batch-size", "16", "--teacher-size", "32"], capsys)
    assert code == 0, err
    return stdout.split(" written to ")[1].split(":")[0]


def test_precompute_train_and_eval_from_shards(shards, teacher, tmp_path, capsys):
    _, out = shards
    cache = precompute(spec(out), tmp_path / "caches", teacher, capsys)
    code, _, err = run_cli(["train", "--dataset", spec(out), "--model", "cnn", "--cache", cache, "--epochs", "1",
                            "--batch-size", "8", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["eval", "--dataset", spec(out), "--model", "cnn", "--weights",
                                 str(tmp_path / "run" / "model.pt"), "--split", "val", "--size", "32"], capsys)
    assert code == 0 and "top-1" in stdout, err
    from kdcache import open_cache

    assert [p["name"] for p in open_cache(cache).manifest["dataset"]["parts"]] == [
        f"train-{k:06d}.tar" for k in range(4)]


def _rewrite(shard: Path, rename: dict[str, str] | None = None, drop_ext: str | None = None,
             replace: dict[str, bytes] | None = None) -> None:
    """Write ``shard`` again with members renamed, one extension dropped or members' bytes replaced."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if drop_ext and member.name.endswith("." + drop_ext):
                continue
            data = (replace or {}).get(member.name, data)
            info = tarfile.TarInfo((rename or {}).get(member.name, member.name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("change,says", [
    ("added", "shard train-000004.tar added"),
    ("reordered", "the shards are in another order"),
    ("renamed", "the samples of shard train-000001.tar differ"),
])
def test_train_refuses_a_cache_made_from_other_shards_naming_what_differs(shards, teacher, tmp_path, capsys,
                                                                         change, says):
    _, out = shards
    cache = precompute(spec(out), tmp_path / "caches", teacher, capsys)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    dataset = spec(other)
    if change == "added":
        shutil.copy(other / "train-000003.tar", other / "train-000004.tar")
        with tarfile.open(other / "train-000004.tar") as tar:  # its samples under keys of their own
            names = tar.getnames()
        _rewrite(other / "train-000004.tar", rename={name: "extra-" + name for name in names})
        dataset = f"wds:{other}/train-{{000000..000004}}.tar"
    elif change == "reordered":
        dataset = f"wds:{other}/train-{{000001,000000,000002,000003}}.tar"
    else:
        with tarfile.open(other / "train-000001.tar") as tar:
            first = tar.getnames()[0].rsplit(".", 1)[0]
        _rewrite(other / "train-000001.tar", rename={f"{first}.jpg": "renamed.jpg", f"{first}.cls": "renamed.cls"})
    code, _, err = run_cli(["train", "--dataset", dataset, "--model", "cnn", "--cache", cache, "--epochs", "1",
                            "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "run").exists()


def test_a_truncated_shard_is_one_line_naming_it(shards, tmp_path):
    _, out = shards
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    data = (copy / "train-000002.tar").read_bytes()
    (copy / "train-000002.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataCorrupt, match="shard .*train-000002.tar is damaged after sample") as info:
        open_source(spec(copy))
    assert "\n" not in str(info.value)


def test_a_sample_without_label_is_one_line_naming_shard_and_key(shards, tmp_path):
    _, out = shards
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    _rewrite(copy / "train-000001.tar", drop_ext="cls")
    with pytest.raises(DataCorrupt, match=r"shard .*train-000001.tar: sample train0000000\d has no .cls label"):
        open_source(spec(copy))


def test_an_image_that_does_not_decode_stops_precompute_in_one_line(shards, teacher, tmp_path, capsys):
    _, out = shards
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    with tarfile.open(copy / "train-000003.tar") as tar:
        victim = tar.getnames()[2]
    _rewrite(copy / "train-000003.tar", replace={victim: b"not a jpeg at all"})
    code, _, err = run_cli(["precompute", "--dataset", spec(copy), "--teacher", "cnn", "--weights", teacher,
                            "--views", "1", "--out", str(tmp_path / "c"), "--device", "cpu", "--quiet"], capsys)
    key = victim.rsplit(".", 1)[0]
    assert code == 2 and err.count("\n") == 1 and f"train-000003.tar: the image of sample {key} does not decode" in err


def test_missing_shards_and_a_missing_val_split_say_how_to_name_them(shards, tmp_path):
    _, out = shards
    with pytest.raises(MissingData, match=r"train-000004.tar not found \(6 of the pattern's 10 shards are missing\)"):
        open_source(f"wds:{out}/train-{{000000..000009}}.tar")
    with pytest.raises(MissingData, match=r"shard .*/nothing/train-0.tar not found \(2 of the pattern's 2"):
        open_source(f"wds:{tmp_path}/nothing/train-{{0..1}}.tar")  # the pattern is wrong, not the val split
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(out / "train-000000.tar", lone / "train-000000.tar")
    with pytest.raises(MissingData, match=r"\?val=PATTERN"):
        open_source(f"wds:{lone}/train-{{000000..000000}}.tar")


def test_shards_on_s3_read_each_byte_once_per_pass_and_match_the_local_copy(shards, teacher, s3_root, tmp_path,
                                                                            capsys, monkeypatch):
    """The real SeaweedFS server: the S3 copy has the local copy's fingerprint (a cache made from one trains
    from the other), and a pass over every sample in index order fetches no shard byte twice."""
    import fsspec
    import s3fs

    _, out = shards
    fs, root = fsspec.core.url_to_fs(s3_root)
    for shard in sorted(out.glob("*.tar")):
        fs.put_file(str(shard), f"{root}/{shard.name}")
    remote = f"wds:{s3_root}/train-{{000000..000003}}.tar"
    source = open_source(remote)
    assert source.fingerprint == open_source(spec(out)).fingerprint and len(source.test) == 6

    fetched = []
    original = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range",
                        lambda self, start, end: fetched.append(end - start) or original(self, start, end))
    for i in range(len(source.train)):
        source.train[i]
    assert 0 < sum(fetched) <= sum(f.stat().st_size for f in out.glob("train-*.tar"))

    # A shuffled batch is fetched in one concurrent round and renders what the local shards render.
    import numpy as np

    from kdcache.augment import Recipe
    from kdcache.models.preprocess import Preprocess
    from kdcache.views import Renderer

    recipe, order = Recipe.parse("rrc+flip"), [13, 2, 7, 0, 17, 8]
    params = recipe.sample(1, np.array(order), np.zeros(len(order), dtype=np.int64), 18)
    views = [Renderer.for_model(s.train, recipe, Preprocess(s.mean, s.std, 32)).batch(order, params)
             for s in (source, open_source(spec(out)))]
    assert torch.equal(views[0], views[1])

    cache = precompute(spec(out), tmp_path / "caches", teacher, capsys)
    code, _, err = run_cli(["train", "--dataset", remote, "--model", "cnn", "--cache", cache, "--epochs", "1",
                            "--batch-size", "8", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 0, err
    # The student's loader fetches each next batch while the current one renders: the same batches.
    from kdcache import loader

    batches = [list(loader(cache, dataset, batch_size=5)) for dataset in (remote, spec(out))]
    assert len(batches[0]) == 4 and all(torch.equal(a["input"], b["input"]) for a, b in zip(*batches))


def test_a_second_open_reads_the_kept_index_and_a_changed_shard_is_scanned_again(shards, tmp_path, monkeypatch):
    from kdcache.data import wds_index

    _, out = shards
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    first = open_source(spec(copy))
    scanned = []
    original = wds_index._scan_shard
    monkeypatch.setattr(wds_index, "_scan_shard", lambda url, *a: scanned.append(url) or original(url, *a))
    assert open_source(spec(copy)).fingerprint == first.fingerprint and not scanned
    _rewrite(copy / "train-000002.tar", drop_ext="nothing-is-dropped")  # same members, a new file
    (copy / "train-000002.tar").write_bytes((copy / "train-000002.tar").read_bytes() + bytes(10240))
    assert open_source(spec(copy)).fingerprint == first.fingerprint
    assert [Path(u).name for u in scanned] == ["train-000002.tar"]
