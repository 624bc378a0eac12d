"""Model specs, weights files and layer listing."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from kdcache import models
from kdcache.errors import InvalidSpec, MissingData, MissingDependency, WeightsMismatch
from kdcache.models import create_model, list_layers, load_weights

BUILTINS = [name for name, _ in models.available() if ":" not in name]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and " — " in message, message
    return message


@pytest.mark.parametrize("shape, classes", [((1, 28, 28), 10), ((3, 32, 32), 100), ((1, 8, 8), 7)])
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_model_maps_images_of_any_small_size_to_logits(name, shape, classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_channels=shape[0]).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, classes)


def test_builtin_prefix_names_the_same_model():
    plain = create_model("resnet8x4", 10)
    prefixed = create_model("builtin:resnet8x4", 10)
    assert plain.state_dict().keys() == prefixed.state_dict().keys()


def test_builtin_resnets_have_feature_layers_and_fc():
    names = dict(create_model("resnet20", 10).named_modules())
    assert {"layer1", "layer2", "layer3", "fc"} <= names.keys()
    assert isinstance(names["fc"], torch.nn.Linear)


def test_torchvision_model_gets_a_one_channel_stem():
    model = create_model("torchvision:resnet18", num_classes=10, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_model_without_resnet_stem_is_adapted():
    model = create_model("torchvision:mobilenet_v3_small", num_classes=4, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_module_callable_receives_num_classes_and_in_channels():
    model = create_model("kdcache.models:SmallCNN", num_classes=5, in_channels=1)
    assert isinstance(model, models.SmallCNN)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)


def test_module_callable_without_in_channels_gets_its_stem_replaced():
    model = create_model("torchvision.models:resnet18", num_classes=3, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3


@pytest.mark.parametrize("spec", ["resnet9", "builtin:nope", "torchvision:not_a_model",
                                  "no_such_module_xyz:make", "kdcache.models:no_such_factory",
                                  "kdcache.models:BUILTINS", "kdcache.models:available"])
def test_unknown_model_spec_is_invalid(spec):
    with pytest.raises(InvalidSpec) as excinfo:
        create_model(spec, 10)
    one_line_error(excinfo)


def test_timm_model_without_timm_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` does where it is not installed
    with pytest.raises(MissingDependency) as excinfo:
        create_model("timm:resnet18", 10)
    assert "pip install 'kdcache[timm]'" in one_line_error(excinfo)


def trained_pair(num_classes: int = 10) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A model with non-default weights and buffers, and a fresh one of the same architecture."""
    torch.manual_seed(0)
    source = create_model("resnet8", num_classes)
    source.train()
    source(torch.randn(4, 3, 16, 16))  # moves the BatchNorm running statistics
    torch.manual_seed(1)
    return source.eval(), create_model("resnet8", num_classes).eval()


def assert_same_function(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(a(x), b(x))


def test_weights_round_trip(tmp_path):
    source, target = trained_pair()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    load_weights(target, tmp_path / "w.pt")
    assert_same_function(source, target)


@pytest.mark.parametrize("wrap", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_weights_from_ddp_or_compiled_models_load(tmp_path, wrap):
    source, target = trained_pair()
    torch.save({"epoch": 3, "model": {wrap + k: v for k, v in source.state_dict().items()}},
               tmp_path / "w.pt")
    load_weights(target, str(tmp_path / "w.pt"))
    assert_same_function(source, target)


def test_weights_under_state_dict_key_load(tmp_path):
    source, target = trained_pair()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    load_weights(target, tmp_path / "w.pt")
    assert_same_function(source, target)


def test_weights_for_other_class_count_name_the_key_and_both_shapes(tmp_path):
    source, _ = trained_pair(num_classes=100)
    torch.save(source.state_dict(), tmp_path / "t.pt")
    with pytest.raises(WeightsMismatch) as excinfo:
        load_weights(create_model("resnet8", 10), tmp_path / "t.pt", spec="resnet8")
    message = one_line_error(excinfo)
    assert "resnet8" in message and "fc.weight" in message
    assert "(100, 64)" in message and "(10, 64)" in message and "another dataset" in message


def test_weights_of_another_architecture_name_the_first_key(tmp_path):
    torch.save(create_model("cnn", 10).state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsMismatch) as excinfo:
        load_weights(create_model("resnet8", 10), tmp_path / "w.pt")
    assert "conv1.weight is missing" in one_line_error(excinfo)


def test_weights_with_extra_keys_are_refused(tmp_path):
    source, target = trained_pair()
    torch.save({**source.state_dict(), "head.weight": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(WeightsMismatch) as excinfo:
        load_weights(target, tmp_path / "w.pt")
    assert "head.weight" in one_line_error(excinfo)


def test_missing_weights_file_is_missing_data(tmp_path):
    with pytest.raises(MissingData) as excinfo:
        load_weights(create_model("cnn", 10), tmp_path / "absent.pt")
    one_line_error(excinfo)


def test_unreadable_weights_file_is_a_mismatch(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatch) as excinfo:
        load_weights(create_model("cnn", 10), tmp_path / "w.pt")
    assert "cannot read weights file" in one_line_error(excinfo)


def test_file_sha256_matches_hashlib(tmp_path):
    payload = bytes(range(256)) * 5000
    (tmp_path / "w.pt").write_bytes(payload)
    assert models.file_sha256(tmp_path / "w.pt") == "sha256:" + hashlib.sha256(payload).hexdigest()


def test_list_layers_gives_resnet8x4_stage_shapes_and_keeps_training_mode():
    model = create_model("resnet8x4", 100)
    model.train()
    layers = dict(list_layers(model, (3, 32, 32)))
    assert layers["layer1"] == (64, 32, 32)
    assert layers["layer2"] == (128, 16, 16)
    assert layers["layer3"] == (256, 8, 8)
    assert layers["fc"] == (100,)
    assert model.training


def test_list_layers_follows_execution_order_without_duplicates():
    names = [name for name, _ in list_layers(create_model("resnet8", 10, 1), (1, 28, 28))]
    assert len(names) == len(set(names))
    assert names.index("layer1") < names.index("layer2") < names.index("layer3") < names.index("fc")
    assert names.index("layer1.0.conv1") < names.index("layer1")


class _Payload:
    """An object torch.save pickles as code to import and call: what an untrusted weights file may hold."""


@pytest.mark.parametrize("kind", ["pickled-object", "truncated", "garbage"])
def test_unreadable_weights_are_one_line_and_never_advise_unpickling(tmp_path, kind):
    model = create_model("cnn", 10)
    path = tmp_path / "w.pt"
    if kind == "pickled-object":
        torch.save({"state_dict": _Payload()}, path)
    elif kind == "truncated":
        torch.save(model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(WeightsMismatch) as excinfo:
        load_weights(model, path)
    message = one_line_error(excinfo)
    assert "weights_only" not in message and "will likely succeed" not in message
    assert ("pickled code" in message) if kind == "pickled-object" else ("truncated" in message)


def test_safetensors_weights_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = create_model("cnn", 10)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = create_model("cnn", 10)
    load_weights(target, tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
