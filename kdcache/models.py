"""Models named by spec strings, and their weights files.

Spec forms: a built-in name (``resnet8x4``, also ``builtin:resnet8x4``), ``torchvision:NAME``,
``timm:NAME`` and ``module.path:callable``. The built-ins are the CIFAR networks of the
distillation literature (CRD, mdistiller); the ResNets keep those repositories' parameter names, so
their checkpoints load as they are. All end in an adaptive average pool, so any input size from
8x8 up works.
See docs/datasets-and-models.md.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from kdcache.errors import InvalidSpec, MissingData, MissingDependency, WeightsMismatch
from kdcache.extras import require

# ---------------------------------------------------------------------------------------------
# Built-in networks


class BasicBlock(nn.Module):
    """The two-conv residual block of CIFAR ResNets."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3x3 stem of ``widths[0]`` channels, then ``layer1..3`` of n
    BasicBlocks with ``widths[1..3]`` channels (strides 1, 2, 2), adaptive pool, ``fc``."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int,
                 in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(inplanes, planes, stride),
                             *(BasicBlock(planes, planes) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBlock(nn.Module):
    """The pre-activation block of Wide ResNets."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem of 16 channels, ``layer1..3`` of (depth-4)/6 WideBlocks with 16k, 32k,
    64k channels, final BN-ReLU, adaptive pool, ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(WideBlock(inplanes, planes, stride),
                             *(WideBlock(planes, planes, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SmallCNN(nn.Module):
    """Two conv-ReLU-maxpool layers (16 and 32 channels) and a linear classifier: for fast tests."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


def _init(model: nn.Module) -> None:
    """The initialisation of the CRD/mdistiller CIFAR networks."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resnet(depth: int, widths: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, widths, num_classes, in_channels)
    return factory


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return WideResNet(depth, widen, num_classes, in_channels)
    return factory


_NARROW, _WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
# name -> (factory(num_classes=, in_channels=), description)
BUILTINS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "cnn": (SmallCNN, "2 conv layers + linear (layer1, layer2, fc), for tests"),
    **{f"resnet{d}": (_resnet(d, _NARROW), f"CIFAR ResNet-{d}, widths 16/32/64")
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (_resnet(8, _WIDE), "CIFAR ResNet-8, widths 64/128/256: a common KD student"),
    "resnet32x4": (_resnet(32, _WIDE), "CIFAR ResNet-32, widths 64/128/256: a common KD teacher"),
    **{f"wrn_{d}_{k}": (_wrn(d, k), f"Wide ResNet-{d}-{k}")
       for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
}


# ---------------------------------------------------------------------------------------------
# Specs


def available() -> list[tuple[str, str]]:
    """(name, description) of every built-in model and spec form, for ``kdcache models``."""
    return [(name, description) for name, (_, description) in BUILTINS.items()] + [
        ("torchvision:NAME", "any torchvision classification model, e.g. torchvision:resnet18; pretrained "
                             "with --weights torchvision:TAG (docs/teachers.md)"),
        ("timm:NAME[.TAG]", "any timm model (pip install 'kdcache[timm]'); pretrained with --weights pretrained"),
        ("hf:PATH", "a Hugging Face image classifier folder or cached hub id, with its weights "
                    "(pip install 'kdcache[hf]'); teachers and eval only"),
        ("module.path:callable", "callable(num_classes=, in_channels=) returning an nn.Module"),
    ]


def create_model(spec: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the untrained model named by ``spec``; raises InvalidSpec or MissingDependency."""
    kind, sep, name = spec.strip().partition(":")
    if not sep or kind == "builtin":
        name = name if sep else kind
        if name not in BUILTINS:
            raise InvalidSpec(f"unknown model {spec!r} — use one of {', '.join(BUILTINS)}, "
                              "torchvision:NAME, timm:NAME or module.path:callable")
        return BUILTINS[name][0](num_classes=num_classes, in_channels=in_channels)
    if kind == "torchvision":
        return _torchvision(name, num_classes, in_channels)
    if kind == "timm":
        return _timm(name, num_classes, in_channels)
    if kind == "hf":
        raise InvalidSpec(f"{spec} is a pretrained Hugging Face model, loaded with its weights — use it as "
                          "--teacher, --online-teacher or in eval, and pick another spec for a student")
    return _imported(spec, kind, name, num_classes, in_channels)


def _torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision.models

    if name not in torchvision.models.list_models(torchvision.models):
        raise InvalidSpec(f"unknown torchvision model {name!r} — see "
                          "torchvision.models.list_models() for the classification models")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return _set_in_channels(model, in_channels)


def _timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    timm = require("timm", "timm", f"model timm:{name}")
    if not timm.is_model(name):
        raise InvalidSpec(f"unknown timm model {name!r} — see timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def _imported(spec: str, module_name: str, attr: str, num_classes: int,
              in_channels: int) -> nn.Module:
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidSpec(f"cannot load model {spec!r}: {e} — use module.path:callable with the "
                          "module importable (on PYTHONPATH)") from None
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not callable(factory) or not ("num_classes" in params or takes_kwargs):
        raise InvalidSpec(f"model {spec!r} is not a callable taking num_classes= — point the "
                          "spec at a function or class callable(num_classes=, in_channels=)")
    # in_channels is passed only when named: **kwargs often forward to a constructor without it.
    if "in_channels" in params:
        model = factory(num_classes=num_classes, in_channels=in_channels)
    else:
        model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise InvalidSpec(f"model {spec!r} returned {type(model).__name__}, not a "
                          "torch.nn.Module — make the callable return the model")
    return model if "in_channels" in params else _set_in_channels(model, in_channels)


def _set_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first Conv2d (in definition order: the stem of every torchvision classifier) by
    one taking ``in_channels``; a no-op when it already does or the model has no Conv2d."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)),
                      ("", None))
    if conv is None or conv.in_channels == in_channels:
        return model
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


# ---------------------------------------------------------------------------------------------
# Weights


def load_weights(model: nn.Module, path: str | os.PathLike, spec: str | None = None) -> None:
    """Load a weights file into ``model``: a state dict (``torch.save`` or ``.safetensors``), or a dict
    holding one under ``state_dict`` or ``model``; DDP (``module.``) and torch.compile (``_orig_mod.``)
    prefixes are stripped. Any missing, unexpected or mis-shaped entry is a one-line WeightsMismatch."""
    apply_state(model, read_state_dict(path), f"weights {path}", spec or type(model).__name__)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, read without running pickled code (``weights_only`` or
    safetensors); unreadable files are one-line WeightsMismatch errors that never suggest
    ``weights_only=False``."""
    if not Path(path).is_file():
        raise MissingData(f"weights file {path} not found — pass the path of a saved state dict")
    how = "save it with torch.save(model.state_dict(), path)"
    try:
        if str(path).endswith(".safetensors"):
            obj = require("safetensors.torch", "timm", f"weights file {path} (safetensors)").load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MissingDependency:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsMismatch(f"cannot read weights file {path}: {_reason(e)} — {how}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatch(f"cannot read weights file {path}: it holds no state dict — {how}")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _reason(error: Exception) -> str:
    """The first line of a loading error, without torch's advice to unpickle untrusted code."""
    text = str(error).strip()
    if "Unsupported global" in text:
        return "it is not a plain state dict (it holds pickled code or objects, which kdcache never runs)"
    if ("weights_only" in text or isinstance(error, (EOFError, OSError)) or "PytorchStreamReader" in text
            or "zip archive" in text):
        return "the file is truncated or not a PyTorch/safetensors file"
    return text.splitlines()[0] if text else type(error).__name__


def apply_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, name: str) -> None:
    """Load ``state`` into ``model`` after checking every entry fits (one-line WeightsMismatch)."""
    problem = _first_mismatch(model.state_dict(), state)
    if problem:
        raise WeightsMismatch(f"{what} do not fit {name}: {problem}")
    model.load_state_dict(state, strict=False)


def _strip_prefixes(key: str) -> str:
    while key.startswith(("module.", "_orig_mod.")):
        key = key.partition(".")[2]
    return key


def _first_mismatch(expected: Mapping[str, torch.Tensor],
                    found: Mapping[str, torch.Tensor]) -> str | None:
    """Describe the first entry (in model order) that is missing or mis-shaped, else the first
    unexpected one; None when the file fits."""
    classifier = next(reversed(expected), "").rpartition(".")[0] + "."
    for key, tensor in expected.items():
        if key not in found:
            # BatchNorm's step counter only matters with momentum=None; old checkpoints lack it.
            if key.endswith("num_batches_tracked"):
                continue
            return f"{key} is missing from the file — was it saved from another model?"
        if found[key].shape != tensor.shape:
            hint = ("was it trained for another dataset?" if key.startswith(classifier)
                    else "was it saved from another model?")
            return (f"{key} has shape {tuple(found[key].shape)} in the file but "
                    f"{tuple(tensor.shape)} in the model — {hint}")
    extra = next((k for k in found if k not in expected), None)
    if extra is not None:
        return f"the file has {extra}, which the model lacks — was it saved from another model?"
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB blocks: identifies teacher weights in a cache."""
    if not Path(path).is_file():
        raise MissingData(f"weights file {path} not found — pass the path of a saved state dict")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


# ---------------------------------------------------------------------------------------------
# Introspection


def list_layers(model: nn.Module,
                input_shape: tuple[int, int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape without the batch dimension) of every named submodule whose
    output is a tensor, in the order one forward pass on zeros of ``input_shape`` runs them.
    These names are what feature outputs can be recorded from."""
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and name not in seen:
                seen[name] = tuple(output.shape[1:])
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None else torch.float32)
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(seen.items())
