"""Models named by spec strings, with their weights and their own preprocessing.

Spec forms: a built-in CIFAR network (``resnet8x4``, also ``builtin:resnet8x4``, kdcache/models/cifar.py),
``torchvision:NAME``, ``timm:NAME``, ``hf:PATH`` and ``module.path:callable``; one registry
(kdcache/models/registry.py) maps each kind to the module that builds it and loads its zoo weights. Weights
files (kdcache/models/weights.py), each model's preprocessing (kdcache/models/preprocess.py) and class maps
(kdcache/models/class_maps.py) live beside it. See docs/datasets-and-models.md and docs/teachers.md.

Importing this package imports no torch: the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module under kdcache.models that defines it.
_NAMES = {
    "create_model": "registry", "load_model": "registry", "available": "registry", "is_zoo_reference": "registry",
    "family_of": "registry", "FAMILIES": "registry",
    "LoadedModel": "loaded", "PRETRAINED": "loaded",
    "load_weights": "weights", "read_state_dict": "weights", "apply_state": "weights", "file_sha256": "weights",
    "list_layers": "layers",
    "BUILTINS": "cifar", "SmallCNN": "cifar",
    "Preprocess": "preprocess",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'kdcache.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kdcache.models.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
