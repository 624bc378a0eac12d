"""Models from any importable callable: ``module.path:callable``, called with ``num_classes=`` (and
``in_channels=`` when it takes it)."""

from __future__ import annotations

import importlib
import inspect

from torch import nn

from kdcache.errors import InvalidSpec
from kdcache.models.layers import set_in_channels


def build(spec: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    """``module:callable`` of ``spec``, called; ``name`` is the callable's name."""
    return _imported(spec, spec.strip().partition(":")[0], name, num_classes, in_channels)


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
    return model if "in_channels" in params else set_in_channels(model, in_channels)
