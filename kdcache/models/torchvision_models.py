"""torchvision's classifiers: ``torchvision:NAME`` untrained, or with ``--weights torchvision:TAG`` (or
``pretrained``: DEFAULT) the file torchvision's weights enum names, read from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), never downloaded, with the preprocessing of ``weights.transforms()``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import InvalidSpec, MissingData
from kdcache.models.layers import set_in_channels
from kdcache.models.loaded import PRETRAINED, LoadedModel
from kdcache.models.preprocess import Preprocess
from kdcache.models.weights import apply_state, file_sha256, read_state_dict


def build(spec: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ``name``, untrained, for ``num_classes`` and ``in_channels``."""
    import torchvision.models

    _check_name(name)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return set_in_channels(model, in_channels)


def takes(weights: str | None) -> bool:
    """Whether ``--weights`` names torchvision weights."""
    return weights == PRETRAINED or str(weights or "").startswith("torchvision:")


def pretrained(spec: str, name: str, weights: str | None) -> LoadedModel:
    """``name`` with the weights ``torchvision:TAG`` (``pretrained``: DEFAULT) names."""
    tag = "DEFAULT" if weights == PRETRAINED else str(weights).partition(":")[2]
    return _torchvision(spec, name, tag)


def _check_name(name: str) -> None:
    import torchvision.models

    if name not in torchvision.models.list_models(torchvision.models):
        raise InvalidSpec(f"unknown torchvision model {name!r} — see torchvision.models.list_models() for "
                          "the classification models")


def _torchvision(spec: str, name: str, tag: str) -> LoadedModel:
    import torchvision.models

    _check_name(name)
    enum = torchvision.models.get_model_weights(name)
    tags = list(enum.__members__)
    if tag not in tags:
        raise InvalidSpec(f"torchvision {name} has no weights {tag!r} — use one of {', '.join(tags)}")
    weights = enum[tag]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(weights.url)
    if not path.is_file():
        raise MissingData(f"weights file {path.name} of torchvision:{name} {weights} is not in {folder} — copy it "
                          "there (kdcache never downloads; set TORCH_HOME to use another hub folder)")
    state = read_state_dict(path)
    module = torchvision.models.get_model(name, weights=None, **_weights_kwargs(name, weights))
    _fix_legacy_keys(name, state)
    apply_state(module, state, f"weights {path}", spec)
    t = weights.transforms()
    size, resize = int(t.crop_size[0]), int(t.resize_size[0])
    pre = Preprocess(tuple(t.mean), tuple(t.std), size, t.interpolation.value, size / resize,
                     f"torchvision:{name}:{weights.name}")
    classes = tuple(weights.meta["categories"])
    return LoadedModel(module, spec, str(path), file_sha256(path), len(classes), f"torchvision:{weights.name}",
                       pre, classes)


def _weights_kwargs(name: str, weights: Any) -> dict[str, Any]:
    """The architecture arguments torchvision's builders set when given these weights."""
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if name in ("inception_v3", "googlenet"):
        kwargs |= {"transform_input": True, "aux_logits": True, "init_weights": False}
    elif name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif name.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def _fix_legacy_keys(name: str, state: dict[str, torch.Tensor]) -> None:
    """DenseNet checkpoints name ``norm.1`` what the model calls ``norm1`` (torchvision renames them too)."""
    if not name.startswith("densenet"):
        return
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")
    for key in list(state):
        match = pattern.match(key)
        if match:
            state[match.group(1) + match.group(2)] = state.pop(key)
