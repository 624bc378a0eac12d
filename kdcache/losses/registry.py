"""The single place that maps loss names to classes."""

from __future__ import annotations

from typing import Any

from kdcache.errors import InvalidSpec
from kdcache.losses.base import NEEDS, Loss

_LOSSES: dict[str, type[Loss]] = {}


def register(cls: type[Loss]) -> type[Loss]:
    """Class decorator: make a loss available by its ``name``."""
    if cls.name in _LOSSES:
        raise ValueError(f"loss name {cls.name!r} registered twice")
    if not cls.needs <= NEEDS or cls.scope not in {"sample", "batch"}:
        raise ValueError(f"loss {cls.name!r} declares unknown needs or scope")
    if "probs" in cls.needs and not cls.sparse:
        raise ValueError(f"loss {cls.name!r} reads the teacher distribution but says nothing of sparse caches")
    _LOSSES[cls.name] = cls
    return cls


def get(name: str, **hparams: Any) -> Loss:
    """Build the loss called ``name`` with the given hyper-parameters (defaults for the rest)."""
    cls = _LOSSES.get(name)
    if cls is None:
        raise InvalidSpec(f"unknown loss {name!r} — choose one of: {', '.join(sorted(_LOSSES))}")
    return cls(**hparams)


def available() -> list[type[Loss]]:
    """Every registered loss class, sorted by name."""
    return [_LOSSES[name] for name in sorted(_LOSSES)]
