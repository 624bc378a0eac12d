"""Distillation losses: one family per module, each registered by name.

``get("kd", T=4)`` builds a loss; ``available()`` lists them. Every loss declares which teacher
outputs it needs (``needs``) and refuses a cache without them in ``check``.
"""

from __future__ import annotations

from kdcache.losses import (  # noqa: F401  (importing a family registers it)
    amd,
    ce,
    cskd,
    dist,
    dkd,
    dr,
    energy_kd,
    fitnet,
    kd,
    mixkd,
    nkd,
    pld,
    r2kd,
)
from kdcache.losses.base import Batch, Loss, StudentOutput, TeacherBatch
from kdcache.losses.registry import available, get, register

__all__ = [
    "Batch",
    "Loss",
    "StudentOutput",
    "TeacherBatch",
    "available",
    "get",
    "register",
]
