"""Checks of option values that need nothing heavy (no torch, no Zarr), so the command line reports a
wrong argument in well under a second, before any model, dataset or cache is touched."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from kdcache.errors import InvalidSpec

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def positive(name: str, value: float | int | None, allow_none: bool = True) -> None:
    """``value`` is a finite number above 0 (or None where that means "default")."""
    if value is None and allow_none:
        return
    finite(name, value)
    if value <= 0:
        raise InvalidSpec(f"{name} must be positive, got {value} — pass a number above 0")


def at_least(name: str, value: int | float | None, low: float) -> None:
    if value is None:
        return
    finite(name, value)
    if value < low:
        raise InvalidSpec(f"{name} must be at least {low:g}, got {value} — pass {low:g} or more")


#: Upper bounds of counts and sizes, far above any real run, so that a typo (``--views 100000000000``) is one
#: line before anything is laid out rather than a memory error or a cache folder of absurd arrays.
LIMITS = {"--views": 100_000, "--batch-size": 1 << 20, "--chunk-samples": 1 << 20, "--teacher-size": 8192,
          "--size": 8192, "--epochs": 1_000_000, "--workers": 1024, "--warmup-epochs": 1_000_000}


def at_most(name: str, value: int | float | None) -> None:
    """``value`` is at most the option's bound in :data:`LIMITS`."""
    if value is not None and name in LIMITS and value > LIMITS[name]:
        raise InvalidSpec(f"{name} {value} is more than {LIMITS[name]:,}, the most kdcache accepts — pass a smaller "
                          "value")


def at_least_at_most(name: str, value: int | float | None, low: float) -> None:
    """:func:`at_least` ``low``, and :func:`at_most` its bound."""
    at_least(name, value, low)
    at_most(name, value)


def finite(name: str, value: float | int | None) -> None:
    """``value`` is a real, finite number: NaN and infinity are refused (they poison losses and JSON)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidSpec(f"{name} must be a finite number, got {value!r} — NaN and infinity are not values; "
                          "pass a real number")


def in_unit(name: str, value: float, closed_high: bool = False) -> None:
    finite(name, value)
    if not (0 <= value <= 1 if closed_high else 0 <= value < 1):
        raise InvalidSpec(f"{name} must lie in [0, 1{']' if closed_high else ')'}, got {value} — pass a fraction, "
                          "e.g. 0.2")


def seed(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise InvalidSpec(f"--seed must be an integer in [0, 2**64), got {value!r} — pass e.g. --seed 0")


def device(value: str) -> None:
    if not _DEVICE.match(str(value)):
        raise InvalidSpec(f"unknown device {value!r} — use auto, cpu or cuda[:N]")


def outside(option: str, value: str, folder: str | None, what: str) -> None:
    """Refuse an output ``value`` that is ``folder`` or lies inside it (``what`` names the folder): a cache
    written into a dataset's class tree becomes a class of it."""
    from kdcache.locations import inside

    if folder is not None and inside(value, folder):
        raise InvalidSpec(f"{option} {value} lies inside {what} {folder} — writing there would change the data; pass "
                          "a folder outside it")


def output_folder(option: str, value: str) -> None:
    """A local ``--out`` must be a folder (or not exist yet) inside a folder this user may write to;
    URLs are checked by their storage when written."""
    if "://" in value and not value.startswith("file://"):
        return
    path = Path(value.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidSpec(f"{option} {value} is a file, not a folder — pass a folder (it is created if missing)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidSpec(f"{option} {value}: {parent} is a file, not a folder — pass a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidSpec(f"{option} {value}: {parent} is not writable by this user — pass a folder you can write to")
