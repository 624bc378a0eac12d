"""kdcache: run a costly teacher once, cache its outputs in Zarr v3, train many students from the cache.

The flat API — ``from kdcache import precompute, train, open_cache, PrecomputeConfig, TrainConfig,
loader`` — names the stage functions; each is imported on first use, so that importing one stage
(``kdcache.student``) never loads the other.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from kdcache.errors import KdcacheError

__version__ = "0.1.0"

#: Flat name -> the module that defines it.
_FLAT = {
    "PrecomputeConfig": "kdcache.teacher.config",
    "precompute": "kdcache.teacher.precompute",
    "TrainConfig": "kdcache.student.config",
    "train": "kdcache.student.train",
    "loader": "kdcache.student.reader",
    "open_cache": "kdcache.cache.store",
}

__all__ = ["KdcacheError", "__version__", *_FLAT]


#: Modules that moved into the data/ and models/ packages (0.2): the old name still imports, with a
#: DeprecationWarning, for one release.
MOVED = {
    "kdcache.dataset_specs": "kdcache.data.spec",
    "kdcache.image_sets": "kdcache.data.images",
    "kdcache.fake": "kdcache.data.fake",
    "kdcache.wds": "kdcache.data.wds_writer",
    "kdcache.hfds": "kdcache.data.hfds",
    "kdcache.zoo": "kdcache.models.registry",
    "kdcache.preprocess": "kdcache.models.preprocess",
    "kdcache.class_map": "kdcache.models.class_maps",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a name of :data:`MOVED` as the module it moved to, warning once."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: Any) -> Any:
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]} — import that; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        self.specs = {**getattr(self, "specs", {}), module.__name__: module.__spec__}
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self.specs[module.__name__]  # the moved module keeps its own spec


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name not in _FLAT:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_FLAT[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
