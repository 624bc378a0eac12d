"""The red team: every bad input is one `Error: … — …` line, exit 2, no traceback, nothing left behind,
and option values are refused before torch is imported."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
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
    ("views-huge", PRE + ["--views", "99999999999999999999"], "most kdcache accepts"),
    ("batch-huge", TRAIN + ["--batch-size", "10000000000"], "most kdcache accepts"),
    ("brace-empty", [a if a != "fake:64" else "wds:{OUT}/s-{000005..000003}.tar" for a in PRE], "is empty"),
    ("brace-huge", [a if a != "fake:64" else "wds:{OUT}/s-{0..999999999}.tar" for a in PRE], "MAX_SHARDS"),
    ("wds-query", [a if a != "fake:64" else "wds:{OUT}/s-{0..3}.tar?foo=1" for a in PRE], "unknown option 'foo'"),
    ("out-in-dataset", [a.replace("fake:64", "imagefolder:{FOLDER}").replace("{OUT}", "{FOLDER}/train")
                        for a in PRE], "lies inside the dataset"),
    ("train-out-in-dataset", [a.replace("fake:64", "imagefolder:{FOLDER}").replace("{OUT}", "{FOLDER}/train/x")
                              for a in TRAIN], "lies inside the dataset"),
    ("info-proc", ["info", "/proc/kmsg"], "a kernel file system"),
    ("ls-proc", ["ls", "/proc"], "a kernel file system"),
    ("info-fifo", ["info", "{FIFO}"], "not a regular file or folder"),
    ("config-fifo", TRAIN + ["--config", "{FIFO}"], "not a regular file or folder"),
]
# Refused by the options alone: reported before torch is imported (in well under a second).
WITHOUT_TORCH = {"dataset", "views-zero", "views-text", "energy-nan", "energy-inf", "energy-negative", "seed-negative",
                 "nproc-zero", "batch-zero", "teacher-size", "teacher-norm", "out-is-file", "missing-option",
                 "device-unknown", "lr-nan", "lr-zero", "epochs-zero", "train-nproc", "train-out-file", "label-noise",
                 "momentum-inf", "norm", "train-seed", "train-missing", "no-such-command", "config-type", "views-huge",
                 "batch-huge", "brace-empty", "brace-huge", "wds-query", "out-in-dataset", "train-out-in-dataset"}


class _Payload:
    """Pickled as code to import and call: what an untrusted weights file may hold."""


@pytest.fixture
def files(tmp_path, teacher_weights) -> dict[str, str]:
    pickled, truncated = tmp_path / "code.pt", tmp_path / "cut.pt"
    torch.save({"state_dict": _Payload()}, pickled)
    truncated.write_bytes(Path(teacher_weights).read_bytes()[:300])
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "bad.toml").write_text('views = "many"\n')
    folder = tmp_path / "pets"
    for split in ("train", "val"):
        (folder / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / split / "cat" / "0.png")
    os.mkfifo(tmp_path / "fifo")
    return {"{W}": teacher_weights, "{OUT}": str(tmp_path / "out"), "{FILE}": str(tmp_path / "a-file"),
            "{PICKLE}": str(pickled), "{TRUNCATED}": str(truncated), "{BADTOML}": str(tmp_path / "bad.toml"),
            "{FOLDER}": str(folder), "{FIFO}": str(tmp_path / "fifo")}


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
    tree = sorted(str(p) for p in (tmp_path / "pets").rglob("*"))
    code, out, err = run_cli(_argv(argv, files), capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and " — " in lines[0], err
    assert expected in lines[0] and "Traceback" not in err + out
    assert "weights_only" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache folder, run folder or run.toml
    assert sorted(str(p) for p in (tmp_path / "pets").rglob("*")) == tree  # the dataset untouched


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


# --- hostile files (issue 31): confinement, damaged and hostile sources, memory bombs -------------------------

def _manifest(path: Path) -> tuple[Path, dict]:
    meta = path / "zarr.json"
    return meta, json.loads(meta.read_text())


def test_a_manifest_naming_a_path_for_its_id_writes_nothing_outside_its_root(tmp_path, cache_path, capsys):
    import shutil

    root = tmp_path / "deep" / "er" / "root"
    cache = root / Path(cache_path).name
    shutil.copytree(cache_path, cache)
    meta, doc = _manifest(cache)
    doc["attributes"]["kdcache"]["cache_id"] = "x/../../../../ESCAPED"
    meta.write_text(json.dumps(doc))
    code, _, err = run_cli(["upgrade", str(cache)], capsys)
    assert code == 2 and "not a cache id" in err and err.count("\n") == 1
    assert not list(tmp_path.rglob("ESCAPED*")) and sorted(p.name for p in root.iterdir()) == [cache.name]


def test_an_alias_naming_a_path_is_not_followed(tmp_path, cache_path, capsys):
    other = tmp_path / "other" / Path(cache_path).name
    import shutil

    shutil.copytree(cache_path, other)
    (tmp_path / "root").mkdir()
    alias = tmp_path / "root" / "friendly"
    alias.write_text(json.dumps({"kdcache": "alias", "format_version": 1,
                                 "cache_id": f"../other/{Path(cache_path).name}"}))
    code, _, err = run_cli(["info", str(alias), "--quick"], capsys)
    assert code == 2 and "not a cache id" in err and "nothing was followed" in err
    code, out, err = run_cli(["ls", str(tmp_path / "root")], capsys)
    assert "other" not in out  # listed neither as an alias nor followed


def test_an_edited_manifest_is_refused_before_training_on_a_subset(tmp_path, cache_path, capsys):
    import shutil

    cache = tmp_path / "c" / Path(cache_path).name
    shutil.copytree(cache_path, cache)
    meta, doc = _manifest(cache)
    doc["attributes"]["kdcache"]["recipe"]["views"] = 2  # the arrays hold 3 views
    meta.write_text(json.dumps(doc))
    code, _, err = run_cli(["train", "--dataset", "fake:64", "--model", "cnn", "--cache", str(cache), "--epochs", "1",
                            "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 2 and "the manifest says" in err and err.count("\n") == 1
    doc["attributes"]["kdcache"]["recipe"]["views"] = "three"
    meta.write_text(json.dumps(doc))
    code, _, err = run_cli(["info", str(cache), "--quick"], capsys)
    assert code == 2 and "recipe.views is not what a writer records" in err
    meta.write_text("[" * 200_000 + "]" * 200_000)  # nests deeper than any JSON reader recurses
    code, _, err = run_cli(["info", str(cache), "--quick"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def _pickle(payload: bytes) -> bytes:
    return b"\x80\x04" + payload + b"."


@pytest.mark.parametrize(("name", "make", "says"), [
    ("bytearray", lambda: pickle.dumps(_Huge(bytearray, (10**11,)), protocol=2), "MAX_ELEMENTS"),
    ("object-array", lambda: pickle.dumps(_ObjectArray(), protocol=2), "MAX_ELEMENTS"),
    ("binbytes8", lambda: _pickle(b"\x8e" + (100 * 2**30).to_bytes(8, "little") + b"x" * 64), "not a whole pickle"),
    ("nested", lambda: b"\x80\x02" + b"(" * 500 + b"." , "MAX_DEPTH"),
    ("shared", lambda: pickle.dumps(_laughs(30), protocol=2), "MAX_ITEMS"),
])
def test_pickles_of_plain_data_cannot_ask_for_more_memory_than_their_limits(tmp_path, name, make, says):
    from kdcache.errors import DataCorrupt
    from kdcache.interop import pickles

    path = tmp_path / "0.pth.tar"
    path.write_bytes(make())
    with pytest.raises(DataCorrupt, match=says):
        pickles.load(path)


def test_a_compressed_pickle_that_inflates_past_its_limit_is_refused(tmp_path, monkeypatch):
    import gzip

    from kdcache.errors import DataCorrupt
    from kdcache.interop import pickles

    monkeypatch.setattr(pickles, "MAX_DECOMPRESSED", 1 << 20)  # the same check as at 1 GiB, without the GiB
    (tmp_path / "0.pth.tar").write_bytes(gzip.compress(pickle.dumps(b"\0" * (8 << 20), protocol=2)))
    with pytest.raises(DataCorrupt, match="MAX_DECOMPRESSED"):
        pickles.load(tmp_path / "0.pth.tar")


class _Huge:
    """Pickled as ``callable(*args)``: what a hostile file asks an allowed name to do."""

    def __init__(self, call, args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


class _ObjectArray:
    """Pickled as NumPy's own reconstruction of an object array of 1e11 items."""

    def __reduce__(self):
        import numpy as np
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (10**11,), np.dtype(object), False, [])


def _laughs(levels: int) -> list:
    item: list = ["lol"]
    for _ in range(levels):
        item = [item] * 10  # one list, shared ten times: small as a pickle, 10**30 items as a tree
    return item


def test_yaml_anchors_are_refused_before_they_expand(tmp_path):
    from kdcache.errors import InvalidSpec
    from kdcache.interop.tinyvit import read_config

    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(9)]
    (tmp_path / "config.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidSpec, match="anchors or aliases"):
        read_config(tmp_path / "config.json")


def test_an_image_declaring_too_many_pixels_is_refused_before_it_is_decoded(tmp_path, teacher_weights, capsys):
    import struct
    import zlib

    folder = tmp_path / "pets"
    for split in ("train", "val"):
        (folder / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / split / "cat" / "0.png")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)  # 50000x50000 RGB, and no pixel data
    (folder / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    torch.save(__import__("kdcache").models.create_model("cnn", 1, 3).state_dict(), tmp_path / "t.pt")
    code, _, err = run_cli(["precompute", "--dataset", f"imagefolder:{folder}", "--teacher", "cnn", "--weights",
                            str(tmp_path / "t.pt"), "--views", "1", "--out", str(tmp_path / "c"), "--quiet"], capsys)
    assert code == 2 and "KDCACHE_MAX_PIXELS" in err and "1.png" in err and err.count("\n") == 1, err
    assert "DecompressionBomb" not in err


def _shards_of(tmp_path: Path, members: list[tuple[str, bytes]]) -> str:
    """One shard of ``(name, bytes)`` members for train and the same for val: a ``wds:`` spec."""
    import io
    import tarfile

    for split in ("train", "val"):
        with tarfile.open(tmp_path / f"{split}-0.tar", "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return f"wds:{tmp_path}/train-{{0..0}}.tar"


def _png() -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(("members", "says"), [
    ([("a.png", b""), ("a.cls", b"0"), ("b.png", b""), ("b.cls", b"1"), ("a.cls", b"2")], "holds sample a twice"),
    ([("a.png", b""), ("a.cls", b"0"), ("a.cls", b"1")], "two .cls members"),
    ([("a.png", b""), ("a.cls", b"100000000000")], "MAX_CLASSES"),
])
def test_a_shard_with_a_duplicate_key_or_an_absurd_label_is_refused(tmp_path, members, says, monkeypatch):
    from kdcache.data import open_source
    from kdcache.errors import DataCorrupt

    monkeypatch.setenv("KDCACHE_INDEX_DIR", str(tmp_path / "index"))
    spec = _shards_of(tmp_path, [(n, _png() if n.endswith(".png") else d) for n, d in members])
    with pytest.raises(DataCorrupt, match=says):
        open_source(spec)


def test_hostile_hugging_face_folders_are_one_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    from kdcache.data import open_source
    from kdcache.errors import DataCorrupt, MissingData

    png = _png()
    plain = datasets.Features({"img": datasets.Image(decode=False), "fine": datasets.ClassLabel(names=["a"])})

    def save(name: str, rows: dict, features=plain, splits=("train", "validation")) -> str:
        split = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict({s: split for s in splits}).save_to_disk(str(tmp_path / name))
        return f"hfds:{tmp_path / name}"

    image = {"bytes": png, "path": None}
    ints = datasets.Features({"img": datasets.Image(decode=False), "fine": datasets.Value("int64")})
    spec = save("few-names", {"img": [image, image], "fine": [0, 2]}, ints)
    for info in (tmp_path / "few-names").rglob("dataset_info.json"):  # a ClassLabel naming one class of three
        doc = json.loads(info.read_text())
        doc["features"]["fine"] = {"names": ["a"], "_type": "ClassLabel"}
        info.write_text(json.dumps(doc))
    with pytest.raises(DataCorrupt, match="ClassLabel names 1 classes"):
        open_source(spec)
    strings = datasets.Features({"img": datasets.Image(decode=False), "fine": datasets.Value("string")})
    with pytest.raises(DataCorrupt, match="row 0 has no class label"):
        open_source(save("strings", {"img": [image], "fine": ["cat"]}, strings) + "?label=fine")
    lists = datasets.Features({"img": datasets.Image(decode=False), "fine": datasets.Sequence(datasets.Value("int64"))})
    with pytest.raises(DataCorrupt, match="row 0 has no class label"):
        open_source(save("lists", {"img": [image], "fine": [[0, 1]]}, lists) + "?label=fine")
    with pytest.raises(DataCorrupt, match="row 1 has no image"):
        open_source(save("no-image", {"img": [image, None], "fine": [0, 0]})).train[1]
    with pytest.raises((MissingData, DataCorrupt), match="no rows in its 'train' split|cannot be read"):
        open_source(save("empty", {"img": [], "fine": []}))  # datasets itself cannot read an empty saved split
    spec = save("damaged", {"img": [image], "fine": [0]})
    for arrow in (tmp_path / "damaged").rglob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[: len(arrow.read_bytes()) // 3])
    (tmp_path / "damaged" / "train" / "state.json").write_text("{not json")
    with pytest.raises(DataCorrupt, match="cannot be read"):
        open_source(spec)


@pytest.fixture(scope="module")
def mldr_source(tmp_path_factory) -> tuple[Path, Path]:
    """An image folder and an uncompressed ml-dr reinforcement of it (MixUp, so every field is there)."""
    from interop_sources import make_folder, write_mldr

    root = tmp_path_factory.mktemp("hostile-mldr")
    folder = make_folder(root / "pets", per_class=2)
    write_mldr(folder, root / "src", mix="mixup", views=2, compressed=False)
    return folder, root / "src"


def _first_mixed(entries: list) -> int:
    return next(v for v, e in enumerate(entries) if e["params"].get("mixup") is not None)


@pytest.mark.parametrize(("change", "says"), [
    (lambda e, v: e[v]["params"].update(mixup=float("nan")), "the mixup λ is nan"),
    (lambda e, v: e[v]["params"].update(mixup=5.0), "the mixup λ is 5.0"),
    (lambda e, v: e[v]["params"].update(mixup=-1.0), "the mixup λ is -1.0"),
    (lambda e, v: e[v]["params"].update(id2=-1), "id2 is -1"),
    (lambda e, v: e[v].update(prob=([0.9, 0.9, 0.9], e[v]["prob"][1])), "sum to 2.7"),
    (lambda e, v: e[v].update(prob=(e[v]["prob"][0], [0, 0, 1])), "names one class twice"),
    (lambda e, v: e[v].update(prob=(e[v]["prob"][0], [0.0, 1.0, 2.0])), "not an integer"),
    (lambda e, v: e[v]["params"].update(random_horizontal_flip=("yes", False)), "not a bool"),
    (lambda e, v: e[v]["params"].update(random_resized_crop=((0, 0, 0, 5), (0, 0, 5, 5))), "outside its image"),
    (lambda e, v: e[v]["params"].update(random_resized_crop=((0, 0, -16, 5), (0, 0, 5, 5))), "outside its image"),
    (lambda e, v: e[v]["params"].update(random_resized_crop=((0, 0, 10**6, 5), (0, 0, 5, 5))), "outside its image"),
])
def test_imported_values_are_checked_like_precomputes_own(mldr_source, tmp_path, change, says):
    import shutil

    from kdcache.errors import KdcacheError
    from kdcache.interop.imports import import_cache

    folder, src = mldr_source
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    t, entries = torch.load(copy / "0.pth.tar", weights_only=False)
    change(entries, _first_mixed(entries))
    torch.save((t, entries), copy / "0.pth.tar")
    with pytest.raises(KdcacheError, match=says):
        import_cache("ml-dr", str(copy), f"imagefolder:{folder}", str(tmp_path / "out"), progress=False)
    assert not list((tmp_path / "out").glob("*/zarr.json")) or not any(
        json.loads(p.read_text())["attributes"].get("kdcache", {}).get("status") == "complete"
        for p in (tmp_path / "out").glob("*/zarr.json"))


@pytest.mark.parametrize(("key", "value", "says"), [
    ("DATA.IMG_SIZE", 10**9, "not a side from 1 to 8192"), ("DATA.IMG_SIZE", 40.9, "not a side"),
    ("DATA.IMG_SIZE", "big", "not a side"),
    ("DATA.INTERPOLATION", ["bicubic"], r"DATA.INTERPOLATION \['bicubic'\]"),  # a traceback before
    ("AUG.REPROB", "0.25", "AUG.REPROB '0.25' is not a number"),  # silently no erasing before
    ("AUG.COLOR_JITTER", "0.4", "AUG.COLOR_JITTER '0.4' is not a number"),
    ("DATA", "x", "DATA is 'x', not a section of settings"),  # silently TinyViT's defaults before
])
def test_a_tinyvit_config_is_checked(tmp_path, key, value, says):
    from interop_sources import make_folder, tinyvit_config, write_tinyvit

    from kdcache.errors import InvalidSpec
    from kdcache.interop.imports import import_cache

    folder = make_folder(tmp_path / "pets", per_class=2)
    write_tinyvit(folder, tmp_path / "logits", epochs=1)
    config = tinyvit_config(tmp_path / "config.json", **{key: value})
    with pytest.raises(InvalidSpec, match=says):
        import_cache("tinyvit", str(tmp_path / "logits"), f"imagefolder:{folder}", str(tmp_path / "o"),
                     config=str(config), progress=False)


def test_damaged_tinyvit_key_files_are_named(tmp_path):
    from interop_sources import make_folder, tinyvit_config, write_tinyvit

    from kdcache.errors import DataCorrupt
    from kdcache.interop.imports import import_cache

    folder = make_folder(tmp_path / "pets", per_class=2)
    write_tinyvit(folder, tmp_path / "logits", epochs=1)
    (tmp_path / "logits" / "logits_top2_epoch0" / "rankX-keys.txt").write_text("0\n")  # not a rank: ignored
    keys = tmp_path / "logits" / "logits_top2_epoch0" / "rank0-keys.txt"
    keys.write_bytes(b"\xff\xfe0\n")
    with pytest.raises(DataCorrupt, match="not ASCII text"):
        import_cache("tinyvit", str(tmp_path / "logits"), f"imagefolder:{folder}", str(tmp_path / "o"),
                     config=str(tinyvit_config(tmp_path / "config.json")), progress=False)


def _tinyvit_source(tmp_path: Path, epochs: int = 2) -> tuple[Path, Path, Path]:
    from interop_sources import make_folder, tinyvit_config, write_tinyvit

    folder = make_folder(tmp_path / "pets", per_class=2)
    write_tinyvit(folder, tmp_path / "logits", epochs=epochs)
    return folder, tmp_path / "logits", tinyvit_config(tmp_path / "config.json")


def _negative_seed(logits: Path) -> None:
    values = logits / "logits_top2_epoch1" / "rank0-values.bin"
    raw = bytearray(values.read_bytes())
    raw[0:4] = (-5).to_bytes(4, "little", signed=True)
    values.write_bytes(bytes(raw))


@pytest.mark.parametrize(("damage", "says"), [
    (_negative_seed, "a saved augmentation seed is negative"),
    (lambda d: (d / "logits_top2_epoch1" / "rank1-keys.txt").unlink() or (d / "logits_top2_epoch1" / "rank1-keys.txt"
                                                                            ).mkdir(), "rank1-keys.txt is a folder"),
    (lambda d: (d / "logits_top2_epoch1" / "rank1-keys.txt").unlink() or os.mkfifo(
        d / "logits_top2_epoch1" / "rank1-keys.txt"), "not a regular file or folder"),  # blocked forever before
    (lambda d: (d / "logits_top2_epoch1" / "rank1-keys.txt").unlink() or (d / "logits_top2_epoch1" / "rank1-keys.txt"
                                                                            ).symlink_to("/proc/self/environ"),
     "lies on /proc"),  # read and parsed as keys before
    (lambda d: os.mkfifo(d / "logits_top2_epoch1" / "rank9-notes"), None),  # not a rank file: not read (blocked)
    (lambda d: (d / "logits_top2_epoch1" / "rank-junk").mkdir(), None),  # not a rank file (a traceback before)
    (lambda d: (d / "logits_top2_epoch99999999999").mkdir(), "lacks epoch 2 of 0..99999999999"),  # 1e11 ints before
    (lambda d: (d / "logits_top2_epoch2").write_text(""), "named like an epoch folder but is not a folder"),
])
def test_hostile_tinyvit_files_are_one_line_or_ignored(tmp_path, damage, says):
    """Each of these crashed, blocked or read outside the source before (red-team 2026-12-07)."""
    from kdcache.errors import KdcacheError
    from kdcache.interop.imports import import_cache

    folder, logits, config = _tinyvit_source(tmp_path)
    damage(logits)
    run = lambda: import_cache("tinyvit", str(logits), f"imagefolder:{folder}", str(tmp_path / "o"),  # noqa: E731
                               config=str(config), progress=False)
    if says is None:
        from kdcache import open_cache

        assert open_cache(run().path).views == 2
    else:
        with pytest.raises(KdcacheError, match=says):
            run()


def test_a_tinyvit_keys_file_past_its_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from kdcache.errors import InvalidSpec
    from kdcache.interop import tinyvit_files
    from kdcache.interop.imports import import_cache

    folder, logits, config = _tinyvit_source(tmp_path, epochs=1)
    monkeypatch.setattr(tinyvit_files, "MAX_KEYS_BYTES", 4)
    with pytest.raises(InvalidSpec, match=r"rank0-keys.txt holds \d+ bytes, more than 4 \(MAX_KEYS_BYTES\)"):
        import_cache("tinyvit", str(logits), f"imagefolder:{folder}", str(tmp_path / "o"), config=str(config),
                     progress=False)


@pytest.mark.parametrize("num_ops, says", [(float("inf"), "num_ops inf is not a whole number"),
                                           (2.7, "num_ops 2.7 is not a whole number")])
def test_an_ml_dr_rand_augment_of_no_whole_number_of_ops_is_one_line(mldr_source, tmp_path, num_ops, says):
    import shutil

    from kdcache.errors import InvalidSpec
    from kdcache.interop.imports import import_cache

    folder, src = mldr_source
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    config = torch.load(copy / "config.pth.tar", weights_only=False)
    config["reinforce"]["image_augmentation"]["rand_augment"] = {"num_ops": num_ops}
    torch.save(config, copy / "config.pth.tar")
    with pytest.raises(InvalidSpec, match=says):  # an OverflowError traceback before, 2.7 taken as 2
        import_cache("ml-dr", str(copy), f"imagefolder:{folder}", str(tmp_path / "out"), progress=False)


def test_import_into_a_file_and_an_image_name_that_is_not_utf8_are_one_line(tmp_path, capsys):
    from interop_sources import make_folder

    folder, logits, config = _tinyvit_source(tmp_path, epochs=1)
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["import", "tinyvit", str(logits), "--dataset", f"imagefolder:{folder}", "--out",
                            str(tmp_path / "file"), "--source-config", str(config)], capsys)
    assert code == 2 and "--out" in err and "is a file, not a folder" in err and err.count("\n") == 1, err
    odd = make_folder(tmp_path / "odd", per_class=2)
    first = sorted((odd / "train").rglob("*.png"))[0]
    os.rename(first, os.path.join(os.fsencode(first.parent), b"bad\xff\xfe.png"))
    code, _, err = run_cli(["import", "tinyvit", str(logits), "--dataset", f"imagefolder:{odd}", "--out",
                            str(tmp_path / "o"), "--source-config", str(config)], capsys)
    assert code == 2 and "is not printable UTF-8 text" in err and err.count("\n") == 1, err


def test_export_into_a_file_under_a_file_or_proc_is_one_line_and_a_killed_export_finishes(tmp_path, capsys):
    from interop_sources import make_folder, write_mldr

    from kdcache.interop.imports import import_cache

    folder = make_folder(tmp_path / "pets", per_class=2)
    write_mldr(folder, tmp_path / "src", views=2)
    cache = import_cache("ml-dr", str(tmp_path / "src"), f"imagefolder:{folder}", str(tmp_path / "c"),
                         progress=False).path
    (tmp_path / "a-file").write_text("x")
    for out, says in ((tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "x", "lies under a file"),
                      (Path("/proc/kdcache-export"), "kernel file system")):
        code, _, err = run_cli(["export", "ml-dr", cache, str(out), "--quiet"], capsys)
        assert code == 2 and says in err and err.count("\n") == 1, err
    code, _, err = run_cli(["export", "ml-dr", cache, str(tmp_path / "e"), "--quiet"], capsys)
    assert code == 0, err
    whole = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}
    (tmp_path / "e" / "config.pth.tar").unlink()  # killed before its last write, and mid-way through a sample
    (tmp_path / "e" / "3.pth.tar").unlink()
    (tmp_path / "e" / "4.pth.tar.999.tmp").write_bytes(b"half")
    code, _, err = run_cli(["export", "ml-dr", cache, str(tmp_path / "e"), "--quiet"], capsys)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == whole
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep")
    code, _, err = run_cli(["export", "ml-dr", cache, str(tmp_path / "other"), "--quiet"], capsys)
    assert code == 2 and "is not empty" in err and (tmp_path / "other" / "mine.txt").read_text() == "keep"


def test_an_ml_dr_config_with_text_where_numbers_belong_is_one_line(mldr_source, tmp_path):
    import shutil

    from kdcache.errors import InvalidSpec
    from kdcache.interop.imports import import_cache

    folder, src = mldr_source
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    config = torch.load(copy / "config.pth.tar", weights_only=False)
    config["reinforce"]["num_samples"] = "two"
    config["reinforce"]["image_augmentation"]["random_resized_crop"]["scale"] = ["small", "large"]
    torch.save(config, copy / "config.pth.tar")
    with pytest.raises(InvalidSpec, match="is not an ml-dr configuration kdcache can read"):
        import_cache("ml-dr", str(copy), f"imagefolder:{folder}", str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("command", ["ls", "info"])
def test_s3_without_credentials_is_one_line(monkeypatch, capsys, tmp_path, command):
    """botocore's NoCredentialsError is no OSError: before, ``ls`` and ``info`` of an S3 URL printed its
    traceback. (No request leaves the machine: botocore looks for credentials first.)"""
    pytest.importorskip("s3fs")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import fsspec

    import s3fs

    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        code, _, err = run_cli([command, "s3://kdcache-no-such-bucket/caches"], capsys)
    finally:  # a cached client without credentials would be reused by later S3 tests in this process
        s3fs.S3FileSystem.clear_instance_cache()
    assert code == 2 and "cannot be reached" in err and "credentials" in err and err.count("\n") == 1, err
