"""The one registry of model families, timm-style: a spec's kind names its family, and the family builds the
untrained model, loads its zoo weights and says which ``--weights`` values are its zoo's.

``create_model`` (students, a teacher from a weights file), ``load_model`` (teachers, ``eval``, the online
teacher), ``is_zoo_reference`` and ``available`` (``kdcache models``) all read :data:`FAMILIES`; a new family
is one module with ``build`` (and, for a zoo, ``takes`` and ``pretrained``) plus one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from kdcache.errors import InvalidSpec
from kdcache.models.loaded import PRETRAINED, LoadedModel
from kdcache.models.weights import file_sha256, load_weights


@dataclass(frozen=True)
class Family:
    """A kind of model spec: the module that builds it (``build``; a zoo also has ``takes`` and
    ``pretrained``) and the spec forms ``kdcache models`` lists."""

    kind: str
    module: str  # under kdcache.models
    forms: tuple[tuple[str, str], ...]
    zoo: bool = False

    def code(self) -> ModuleType:
        return importlib.import_module(f"kdcache.models.{self.module}")


FAMILIES: dict[str, Family] = {f.kind: f for f in (
    Family("builtin", "cifar", ()),
    Family("torchvision", "torchvision_models", (
        ("torchvision:NAME", "any torchvision classification model, e.g. torchvision:resnet18; pretrained "
                             "with --weights torchvision:TAG (docs/teachers.md)"),), zoo=True),
    Family("timm", "timm_models", (
        ("timm:NAME[.TAG]", "any timm model (pip install 'kdcache[timm]'); pretrained with --weights pretrained"),),
        zoo=True),
    Family("hf", "hf_models", (
        ("hf:PATH", "a Hugging Face image classifier folder or cached hub id, with its weights "
                    "(pip install 'kdcache[hf]'); teachers and eval only"),), zoo=True),
    Family("module", "callables", (
        ("module.path:callable", "callable(num_classes=, in_channels=) returning an nn.Module"),)),
)}


def family_of(spec: str) -> tuple[Family, str]:
    """(family, name within it) of a model spec: a built-in name (``resnet8x4``, ``builtin:resnet8x4``),
    ``KIND:NAME`` of a registered kind, else ``module.path:callable``."""
    kind, sep, name = spec.strip().partition(":")
    if not sep:
        return FAMILIES["builtin"], kind
    return (FAMILIES[kind], name) if kind in FAMILIES else (FAMILIES["module"], name)


def available() -> list[tuple[str, str]]:
    """(name, description) of every built-in model and spec form, for ``kdcache models``."""
    from kdcache.models.cifar import BUILTINS

    return [(name, about) for name, (_, about) in BUILTINS.items()] + [
        form for family in FAMILIES.values() for form in family.forms]


def create_model(spec: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the untrained model named by ``spec``; raises InvalidSpec or MissingDependency."""
    family, name = family_of(spec)
    return family.code().build(spec, name, num_classes, in_channels)


def is_zoo_reference(spec: str, weights: str | None) -> bool:
    """Whether ``weights`` names zoo weights (or ``spec`` is a model that brings its own) rather than a file."""
    family, _ = family_of(spec)
    return (family.zoo and family.code().takes(weights)) or weights == PRETRAINED or str(weights or "").startswith(
        "torchvision:")


def load_model(spec: str, weights: str | None, num_classes: int, channels: int) -> LoadedModel:
    """``spec`` with ``weights`` loaded, in eval mode. A file is loaded into a model built for
    ``num_classes``; zoo weights keep their own class count (see kdcache/models/class_maps.py)."""
    spec = spec.strip()
    family, name = family_of(spec)
    if family.zoo and family.code().takes(weights):
        loaded = family.code().pretrained(spec, name, weights)
    elif weights is None:
        raise InvalidSpec(f"model {spec} needs weights — pass --weights FILE (a saved state dict), "
                          "--weights torchvision:TAG or --weights pretrained")
    elif str(weights).startswith("torchvision:"):
        raise InvalidSpec(f"--weights {weights} names torchvision weights, but the model is {spec} — "
                          "use --teacher torchvision:NAME")
    elif weights == PRETRAINED:
        raise InvalidSpec(f"--weights pretrained needs a timm:NAME or torchvision:NAME model, not {spec} — "
                          "pass a weights file instead")
    else:
        module = create_model(spec, num_classes, channels)
        load_weights(module, weights, spec=spec)
        loaded = LoadedModel(module, spec, str(weights), file_sha256(weights), num_classes)
    if loaded.preprocess is not None and len(loaded.preprocess.mean) != channels:
        raise InvalidSpec(f"{spec} takes {len(loaded.preprocess.mean)}-channel images, the dataset has {channels} "
                          "— use an RGB dataset with this model")
    loaded.module.eval()
    return loaded
