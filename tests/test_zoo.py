"""Pretrained teachers offline (kdcache/models/: registry.py and one module per zoo): torchvision weights enums, timm, Hugging Face; each kind
is laid out where its zoo keeps files, holding tiny or random models, and every bad input is one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tests_support import precompute_config, run_cli
from zoo_support import TIMM_MODEL, TV_MODEL, TV_TAG, hf_classifier, jpeg_folder, timm_hub, torchvision_hub

from kdcache.cache.store import open_cache
from kdcache.errors import InvalidSpec, KdcacheError, MissingData, MissingDependency
from kdcache.models.preprocess import Preprocess
from kdcache.teacher.precompute import precompute
from kdcache.models import load_model


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and " — " in message, message
    return message


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return torchvision_hub(tmp_path / "torch")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes of non-square 240-330 px JPEGs."""
    return jpeg_folder(tmp_path_factory.mktemp("jpegs"))


def test_torchvision_tag_loads_the_hub_file_with_its_preprocessing_and_classes(torch_home):
    loaded = load_model(f"torchvision:{TV_MODEL}", f"torchvision:{TV_TAG}", 3, 3)
    expected = torch.load(torch_home, weights_only=True)
    assert all(torch.equal(v, expected[k]) for k, v in loaded.module.state_dict().items())
    assert loaded.tag == f"torchvision:{TV_TAG}" and loaded.weights == str(torch_home)
    assert loaded.num_classes == 1000 and loaded.classes[0] == "tench"
    pre = loaded.preprocess
    assert (pre.size, pre.resize_size, pre.interpolation) == (224, 256, "bilinear")
    assert pre.mean == (0.485, 0.456, 0.406) and not loaded.module.training


def test_torchvision_default_and_pretrained_name_the_same_weights(torch_home):
    default = load_model(f"torchvision:{TV_MODEL}", "torchvision:DEFAULT", 3, 3)
    pretrained = load_model(f"torchvision:{TV_MODEL}", "pretrained", 3, 3)
    assert default.sha256 == pretrained.sha256 and default.tag == pretrained.tag == f"torchvision:{TV_TAG}"


def test_unknown_torchvision_tag_lists_the_valid_ones(torch_home):
    with pytest.raises(InvalidSpec) as excinfo:
        load_model(f"torchvision:{TV_MODEL}", "torchvision:IMAGENET1K_V9", 3, 3)
    assert "IMAGENET1K_V1" in one_line(excinfo) and "DEFAULT" in str(excinfo.value)


def test_missing_hub_file_names_the_file_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(MissingData) as excinfo:
        load_model(f"torchvision:{TV_MODEL}", f"torchvision:{TV_TAG}", 3, 3)
    message = one_line(excinfo)
    assert "shufflenetv2_x0.5-f707e7126e.pth" in message and str(tmp_path / "empty" / "hub" / "checkpoints") in message


def test_tag_for_another_kind_of_model_is_refused():
    with pytest.raises(InvalidSpec) as excinfo:
        load_model("cnn", "torchvision:DEFAULT", 3, 3)
    assert "torchvision:NAME" in one_line(excinfo)


def test_timm_pretrained_loads_from_the_hugging_face_cache_with_its_pretrained_cfg(hf_cache):
    path = timm_hub(hf_cache)
    loaded = load_model(f"timm:{TIMM_MODEL}", "pretrained", 3, 3)
    assert loaded.weights == str(path) and loaded.tag == f"timm:timm/{TIMM_MODEL}"
    pre = loaded.preprocess
    assert (pre.mean, pre.std, pre.size, pre.crop_pct) == ((0.5,) * 3, (0.5,) * 3, 160, 0.95)
    assert loaded.num_classes == 1000 and loaded.classes[0] == "n01440764"


def test_timm_weights_missing_from_the_cache_name_the_folder(hf_cache):
    with pytest.raises(MissingData) as excinfo:
        load_model(f"timm:{TIMM_MODEL}", "pretrained", 3, 3)
    assert f"models--timm--{TIMM_MODEL}" in one_line(excinfo)


@pytest.mark.parametrize(("package", "spec", "extra"), [("timm", f"timm:{TIMM_MODEL}", "kdcache[timm]"),
                                                        ("transformers", "hf:some/model", "kdcache[hf]")])
def test_missing_optional_package_says_what_to_install(monkeypatch, package, spec, extra):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(MissingDependency) as excinfo:
        load_model(spec, "pretrained", 3, 3)
    assert extra in one_line(excinfo)


def test_hf_folder_loads_with_its_image_processor(tmp_path):
    folder = hf_classifier(tmp_path / "tiny", num_labels=5)
    loaded = load_model(f"hf:{folder}", None, 5, 3)
    pre = loaded.preprocess
    assert (pre.size, pre.interpolation, pre.crop_pct, pre.resize_size) == (35, "bicubic", 0.875, 40)
    assert pre.mean[0] == pytest.approx(0.48145466) and loaded.classes == tuple(f"class{i}" for i in range(5))
    logits = loaded.module(torch.zeros(2, 3, 35, 35))
    assert logits.shape == (2, 5)


def test_hf_hub_id_already_in_the_cache_loads_and_its_id_ignores_where_it_lay(tmp_path, hf_cache):
    folder = hf_classifier(tmp_path / "tiny", num_labels=5)
    snapshot = hf_cache / "models--org--tiny" / "snapshots" / ("ab" * 20)
    shutil.copytree(folder, snapshot)
    (hf_cache / "models--org--tiny" / "refs").mkdir()
    (hf_cache / "models--org--tiny" / "refs" / "main").write_text("ab" * 20)
    from_hub, from_folder = load_model("hf:org/tiny", None, 5, 3), load_model(f"hf:{folder}", None, 5, 3)
    assert from_hub.sha256 == from_folder.sha256


@pytest.mark.parametrize("make", ["no-config", "missing", "uncached-id"])
def test_bad_hf_folder_is_one_line(tmp_path, hf_cache, make):
    folder = tmp_path / "bad"
    if make == "no-config":
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
    spec = "hf:org/absent" if make == "uncached-id" else f"hf:{folder}"
    with pytest.raises(MissingData) as excinfo:
        load_model(spec, None, 5, 3)
    assert ("config.json" if make == "no-config" else "save_pretrained") in one_line(excinfo)


def test_pretrained_teacher_on_gray_images_is_refused(torch_home):
    with pytest.raises(InvalidSpec) as excinfo:
        load_model(f"torchvision:{TV_MODEL}", f"torchvision:{TV_TAG}", 10, 1)
    assert "3-channel" in one_line(excinfo)


def test_precompute_records_tag_sha256_and_preprocessing_and_the_id_ignores_the_hub_location(
        torch_home, folder, tmp_path, monkeypatch):
    cmap = tmp_path / "map.txt"
    cmap.write_text("tench\ngoldfish\n7\n")
    cfg = precompute_config(tmp_path / "c1", f"torchvision:{TV_TAG}", dataset=f"imagefolder:{folder}",
                            teacher=f"torchvision:{TV_MODEL}", class_map=str(cmap), views=1, chunk_samples=12)
    first = precompute(cfg)
    m = first.manifest
    member = m["teacher"]["members"][0]
    assert member["tag"] == f"torchvision:{TV_TAG}" and member["weights"] == str(torch_home)
    assert m["teacher"]["class_map"] == {"teacher_classes": 1000, "indices": [0, 1, 7]}
    rec = m["recipe"]
    assert (rec["input_size"], rec["interpolation"], rec["crop_pct"], rec["mean"]) == (224, "bilinear", 0.875,
                                                                                        [0.485, 0.456, 0.406])
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "torch"), moved)
    monkeypatch.setenv("TORCH_HOME", str(moved))
    again = precompute(precompute_config(tmp_path / "c2", f"torchvision:{TV_TAG}", dataset=f"imagefolder:{folder}",
                                         teacher=f"torchvision:{TV_MODEL}", class_map=str(cmap), views=1,
                                         chunk_samples=12))
    assert again.cache_id == first.cache_id
    norm = precompute(precompute_config(tmp_path / "c3", f"torchvision:{TV_TAG}", dataset=f"imagefolder:{folder}",
                                        teacher=f"torchvision:{TV_MODEL}", class_map=str(cmap), views=1,
                                        chunk_samples=12, teacher_norm="inception"))
    assert norm.cache_id != first.cache_id and norm.manifest["recipe"]["mean"] == [0.5, 0.5, 0.5]
    logits = open_cache(first.path).read_array("logits")
    assert logits.shape == (12, 1, 3)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--weights", f"torchvision:{TV_TAG}"], "--class-map"),
    (["--weights", f"torchvision:{TV_TAG}", "--class-map", "MAP", "--teacher", "hf:NOCONFIG"], "config.json"),
    (["--weights", "torchvision:IMAGENET1K_V1", "--class-map", "MAP", "--teacher", "torchvision:resnet18"],
     "resnet18-f37072fd.pth"),
    (["--weights", "torchvision:NOPE"], "IMAGENET1K_V1"),
    (["--weights", f"torchvision:{TV_TAG}", "--class-map", "MAP", "--teacher-norm", "zebra"], "unknown normalisation"),
    (["--weights", f"torchvision:{TV_TAG}", "--class-map", "BADMAP"], "line 2"),
])
def test_bad_pretrained_teacher_input_is_one_line_and_writes_nothing(torch_home, folder, tmp_path, capsys, argv,
                                                                    expected):
    (tmp_path / "map.txt").write_text("0\n1\n2\n")
    (tmp_path / "bad.txt").write_text("0\nunicorn\n2\n")
    (tmp_path / "noconfig").mkdir()
    argv = [a.replace("BADMAP", str(tmp_path / "bad.txt")).replace("NOCONFIG", str(tmp_path / "noconfig"))
            .replace("MAP", str(tmp_path / "map.txt")) for a in argv]
    if "--teacher" not in argv:
        argv += ["--teacher", f"torchvision:{TV_MODEL}"]
    if argv[argv.index("--teacher") + 1].startswith("hf:"):
        argv = argv[2:]  # a Hugging Face teacher takes no --weights
    code, out, err = run_cli(["precompute", "--dataset", f"imagefolder:{folder}", "--out", str(tmp_path / "caches"),
                              "--quiet", *argv], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "caches").exists()


def test_class_map_errors_name_the_line(tmp_path):
    from kdcache.models.class_maps import read_class_map

    path = tmp_path / "map.txt"
    for text, expected in [("0\n1\n", "2 lines"), ("0\n1000\n2\n", "line 2"), ("0\n0\n2\n", "two dataset classes"),
                           ("tench\nx\n2\n", "line 2")]:
        path.write_text(text)
        with pytest.raises(KdcacheError) as excinfo:
            read_class_map(str(path), ("a", "b", "c"), ("tench", "goldfish"), 1000)
        assert expected in one_line(excinfo)
    path.write_text("# ImageNet ids\ngoldfish\n3  # comment\ntench\n")
    assert read_class_map(str(path), ("a", "b", "c"), ("tench", "goldfish"), 1000) == [1, 3, 0]


def test_verify_recompute_and_extend_reload_the_recorded_zoo_teacher_and_class_map(torch_home, folder, tmp_path):
    from kdcache.audit import recompute
    from kdcache.teacher.extend import extend

    cmap = tmp_path / "map.txt"
    cmap.write_text("3\n1\n2\n")
    made = precompute(precompute_config(tmp_path / "caches", f"torchvision:{TV_TAG}", dataset=f"imagefolder:{folder}",
                                        teacher=f"torchvision:{TV_MODEL}", class_map=str(cmap), views=1,
                                        chunk_samples=12, teacher_norm="inception"))
    report = recompute(made.path, 4, device="cpu")
    assert report.pairs == 4 and not report.problems
    grown = extend(made.path, views=2, progress=False, device="cpu")
    report = recompute(grown.path, 6, device="cpu", seed=1)
    assert report.pairs == 6 and not report.problems


def test_online_teacher_takes_zoo_weights_a_class_map_and_its_own_preprocessing(torch_home, folder, tmp_path,
                                                                                  capsys):
    cmap = tmp_path / "map.txt"
    cmap.write_text("0\n1\n2\n")
    base = ["train", "--dataset", f"imagefolder:{folder}", "--model", "cnn", "--out", str(tmp_path / "run"),
            "--epochs", "1", "--size", "24", "--batch-size", "6", "--quiet", "--device", "cpu",
            "--online-teacher", f"torchvision:{TV_MODEL}", "--weights", f"torchvision:{TV_TAG}"]
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "--class-map" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(base + ["--class-map", str(cmap), "--norm", "clip"], capsys)
    assert code == 0, err
    assert "test top-1" in out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["preprocess"]["mean"] == [0.48145466, 0.4578275, 0.40821073] and run["preprocess"]["input_size"] == 24


def test_online_teacher_inputs_are_renormalised_and_resized_to_its_own_preprocessing(torch_home, tmp_path):
    from kdcache import data
    from kdcache.student.online import OnlineTeacher

    source = data.open_source("fake:16")
    cmap = tmp_path / "map.txt"
    cmap.write_text("".join(f"{i}\n" for i in range(source.num_classes)))
    student = Preprocess((0.2, 0.3, 0.4), (0.5, 0.5, 0.5), 16)
    teacher = OnlineTeacher(f"torchvision:{TV_MODEL}", f"torchvision:{TV_TAG}", source, torch.device("cpu"), student,
                            class_map=str(cmap))
    x = torch.rand(2, 3, 16, 16)
    raw = x * 0.5 + torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = torch.nn.functional.interpolate((raw - mean) / std, size=(224, 224), mode="bilinear", antialias=True,
                                               align_corners=False)
    assert torch.allclose(teacher.inputs(x), expected, atol=1e-5)
    assert teacher(x).shape == (2, source.num_classes)


def test_precompute_with_a_timm_teacher_maps_classes_by_synset_and_uses_its_pretrained_cfg(hf_cache, folder,
                                                                                           tmp_path):
    timm_hub(hf_cache)
    cmap = tmp_path / "map.txt"
    cmap.write_text("n01440764\nn01443537\nn01484850\n")
    made = precompute(precompute_config(tmp_path / "caches", "pretrained", dataset=f"imagefolder:{folder}",
                                        teacher=f"timm:{TIMM_MODEL}", class_map=str(cmap), views=1, chunk_samples=12))
    rec = made.manifest["recipe"]
    assert (rec["input_size"], rec["crop_pct"], rec["mean"]) == (160, 0.95, [0.5, 0.5, 0.5])
    assert made.manifest["teacher"]["class_map"]["indices"] == [0, 1, 2]
    assert made.manifest["teacher"]["members"][0]["tag"] == f"timm:timm/{TIMM_MODEL}"


def test_layers_of_a_hugging_face_teacher_are_listed_with_their_names(tmp_path, capsys):
    folder = hf_classifier(tmp_path / "tiny", num_labels=5)
    code, out, err = run_cli(["layers", f"hf:{folder}"], capsys)
    assert code == 0, err
    assert "model.resnet.encoder" in out and "model.classifier" in out
