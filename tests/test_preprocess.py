"""Each model's own preprocessing (kdcache/models/preprocess.py): teacher and student see their own pixels of the
same stored view, and evaluation is torchvision's resize-shorter-side + center crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests_support import precompute_config, run_cli
from zoo_support import TV_MODEL, TV_TAG, hf_classifier, jpeg_folder, torchvision_hub

from kdcache import data
from kdcache.augment import Recipe, resize_view
from kdcache.errors import InvalidSpec
from kdcache.models.preprocess import PRESETS, Preprocess, eval_view, parse_norm, resolve
from kdcache.student.evaluate import eval_loader, evaluate_weights
from kdcache.student.reader import loader
from kdcache.teacher.precompute import precompute


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return jpeg_folder(tmp_path_factory.mktemp("jpegs"))


def _normalised(view: torch.Tensor, mean, std) -> torch.Tensor:
    return (view - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def test_norm_presets_explicit_values_and_dataset():
    assert parse_norm("clip", 3) == PRESETS["clip"]
    assert parse_norm("0.5,0.4,0.3/0.2,0.2,0.1", 3) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.1))
    assert parse_norm("dataset", 3) is None
    assert resolve(None, (0.1,), (0.2,), 1, 28).mean == (0.1,)


@pytest.mark.parametrize(("text", "channels", "expected"), [
    ("zebra", 3, "unknown normalisation"), ("0.5,0.5/0.5", 3, "as many"), ("0.5/0", 1, "as many"),
    ("imagenet", 1, "1 values each"), ("nan,0,0/1,1,1", 3, "finite"),
])
def test_bad_norm_is_one_line(text, channels, expected):
    with pytest.raises(InvalidSpec) as excinfo:
        parse_norm(text, channels)
    message = str(excinfo.value)
    assert "\n" not in message and expected in message, message


def test_teacher_and_student_each_render_the_stored_view_their_own_way(tmp_path, folder):
    """A bicubic, CLIP-normalised 35 px HF teacher and an inception-normalised 20 px student: for the same
    stored params each input is its own model's rendering, both resized with the teacher's bicubic."""
    teacher = hf_classifier(tmp_path / "tiny", num_labels=5)
    cmap = tmp_path / "map.txt"
    cmap.write_text("class4\nclass0\nclass2\n")
    seen: list[torch.Tensor] = []
    result = precompute(precompute_config(tmp_path / "caches", None, dataset=f"imagefolder:{folder}",
                                          teacher=f"hf:{teacher}", class_map=str(cmap), views=2, chunk_samples=12),
                        on_batch=lambda inputs, logits: seen.append(inputs.clone()))
    source = data.open_source(f"imagefolder:{folder}")
    recipe = Recipe.from_manifest(result.manifest["recipe"]["augment"])
    clip = PRESETS["clip"]
    batch = next(iter(loader(result.path, f"imagefolder:{folder}", size=20, batch_size=4, norm="inception")))
    for j in range(4):
        i, v = int(batch["index"][j]), int(batch["view"][j])
        params = {name[len("aug/"):]: open_cache_views(result.path, name, i, v) for name in
                  [f"aug/{f}" for f in recipe.fields()]}
        image = source.train[i][0]
        teacher_view = recipe.apply(image, params, 35, interpolation="bicubic")
        row = i * 2 + v  # precompute runs the views of each sample in order: one batch holds them all
        assert torch.equal(torch.cat(seen)[row], _normalised(teacher_view, *clip))
        student_view = recipe.apply(image, params, 20, interpolation="bicubic")
        assert torch.equal(batch["input"][j], _normalised(student_view, (0.5,) * 3, (0.5,) * 3))


def open_cache_views(path: str, name: str, i: int, v: int) -> np.ndarray:
    from kdcache.cache.store import open_cache

    return open_cache(path).read_views(name, np.array([i]), np.array([v]))[0]


def test_eval_inputs_and_top1_equal_torchvision_weights_transforms_on_an_image_folder(tmp_path, monkeypatch, folder):
    import torchvision
    from torchvision.datasets import ImageFolder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torchvision_hub(tmp_path / "torch")
    weights = torchvision.models.get_model_weights(TV_MODEL)[TV_TAG]
    reference = ImageFolder(str(folder / "val"), transform=weights.transforms())
    source = data.open_source(f"imagefolder:{folder}")
    pre = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, "bilinear", 224 / 256)
    ours = eval_loader(source, "val", pre, batch_size=64).dataset
    assert [Path(p).relative_to(folder).as_posix() for p, _ in reference.samples] == source.test.files
    for k in range(len(reference)):
        assert torch.equal(ours[k][0], reference[k][0])

    cmap = tmp_path / "map.txt"
    cmap.write_text("5\n1\n9\n")
    model = torchvision.models.get_model(TV_MODEL, num_classes=1000).eval()
    model.load_state_dict(torch.load(tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name))
    with torch.no_grad():
        logits = model(torch.stack([reference[k][0] for k in range(len(reference))]))[:, [5, 1, 9]]
    expected = 100.0 * float((logits.argmax(1) == torch.tensor([t for _, t in reference.samples])).float().mean())
    got = evaluate_weights(f"torchvision:{TV_MODEL}", f"torchvision:{TV_TAG}", f"imagefolder:{folder}", "val",
                           class_map=str(cmap), device="cpu")
    assert got["top1"] == pytest.approx(expected)


def test_sources_at_or_below_the_input_size_keep_the_whole_image_resize():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    pre = Preprocess((0.1,), (0.3,), 32)
    assert torch.equal(eval_view(image, pre), _normalised(resize_view(image, 32), (0.1,), (0.3,)))


def test_eval_accepts_val_as_the_test_split_and_refuses_others(tmp_path, folder, capsys):
    from kdcache import models

    torch.manual_seed(0)
    weights = tmp_path / "cnn.pt"
    torch.save(models.create_model("cnn", 3, 3).state_dict(), weights)
    base = ["eval", "--model", "cnn", "--weights", str(weights), "--dataset", f"imagefolder:{folder}", "--size", "32",
            "--device", "cpu", "--json"]
    assert run_cli(base + ["--split", "val"], capsys)[1] == run_cli(base + ["--split", "test"], capsys)[1]
    code, _, err = run_cli(base + ["--split", "holdout"], capsys)
    assert code == 2 and "use train, test or val" in err and len(err.strip().splitlines()) == 1


def test_caches_made_before_interpolation_was_recorded_read_as_bilinear():
    pre = Preprocess.from_manifest({"input_size": 32, "mean": [0.5], "std": [0.25]})
    assert (pre.interpolation, pre.crop_pct, pre.size) == ("bilinear", 0.875, 32)
