"""The grammar of dataset specs (``mnist5k``, ``digits``, ``fake:N[:C[:S]]``, ``imagefolder:PATH``,
``torchvision:NAME:ROOT``, ``wds:PATTERN``, ``hfds:PATH[:SPLIT]``): parsed here without importing torch,
so a wrong ``--dataset`` is reported at once; kdcache/data.py opens what a spec names."""

from __future__ import annotations

from kdcache.errors import InvalidSpec

TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
                    "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}
PATTERNS = ("mnist5k", "digits", "fake:N[:C[:S]]", "imagefolder:PATH", "torchvision:NAME:ROOT",
            "wds:PATTERN[?image=…&label=…&val=PATTERN]", "hfds:PATH[:SPLIT][?image=…&label=…]")


def parse(spec: str) -> tuple[str, str]:
    """``(kind, normalised rest)`` of a dataset spec: ``("fake", "64:10:32")``, ``("imagefolder", PATH)``,
    ``("torchvision", "CIFAR10:ROOT")``, ``("mnist5k", "")``; InvalidSpec for anything else."""
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind in ("imagefolder", "wds", "hfds") and rest:
        return kind, rest
    if kind in ("mnist5k", "digits") and not rest:
        return kind, ""
    if kind == "fake" and rest:
        return kind, ":".join(map(str, fake_params(spec, rest)))
    if kind == "torchvision" and rest:
        name, _, root = rest.partition(":")
        if name.lower() not in TORCHVISION_SETS or not root:
            raise InvalidSpec(f"unknown torchvision dataset spec {spec!r} — use torchvision:NAME:ROOT with NAME one "
                              f"of {', '.join(TORCHVISION_SETS.values())}")
        return kind, f"{TORCHVISION_SETS[name.lower()]}:{root}"
    raise InvalidSpec(f"unknown dataset {spec!r} — use one of: {', '.join(PATTERNS)}")


def fake_params(spec: str, rest: str) -> tuple[int, int, int]:
    """``N[:C[:S]]`` -> (N, C, S) with defaults C=10, S=32, checked."""
    try:
        values = [int(p) for p in rest.split(":")]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or min(values) <= 0:
        raise InvalidSpec(f"bad dataset spec {spec!r} — use fake:N[:C[:S]] with positive "
                          "integers N images, C classes (10), side S (32), e.g. fake:64")
    n, c, s = values + [10, 32][len(values) - 1:]
    return n, c, s
