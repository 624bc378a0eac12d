"""Caches other systems made, as kdcache caches, and kdcache caches in their layouts: ``kdcache import`` and
``kdcache export`` (docs/interop.md).

Each format has one module that knows its files (mldr.py, tinyvit.py); imported.py writes the cache, so
an imported cache is an ordinary one that trains with every logit loss. The files another system wrote are
read as data only: pickles through a restricted unpickler (pickles.py), raw binaries with their sizes
checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcache.errors import InvalidSpec

if TYPE_CHECKING:
    from kdcache.interop.imported import ImportResult

#: ``kdcache import FORMAT``: what each format is.
IMPORT_FORMATS = {
    "ml-dr": "apple/ml-dr reinforcements: <index>.pth.tar per sample (params + top-k probabilities) and config.pth.tar",
    "tinyvit": "microsoft/Cream TinyViT saved logits: logits_top<K>_epoch<E>/rank<R>-{keys.txt,values.bin}",
}
#: ``kdcache export FORMAT``.
EXPORT_FORMATS = {"ml-dr": IMPORT_FORMATS["ml-dr"]}


def import_cache(fmt: str, src: str, dataset: str, out: str, config: str | None = None,
                 progress: bool = True) -> ImportResult:
    """Import the files ``src`` of format ``fmt`` (see :data:`IMPORT_FORMATS`) made over ``dataset`` as a cache
    under root ``out``; a complete cache of the same content there is reused. ``config`` is TinyViT's config."""
    from kdcache import data
    from kdcache.interop import mldr, tinyvit
    from kdcache.interop.imported import write_import

    if fmt not in IMPORT_FORMATS:
        raise InvalidSpec(f"format {fmt!r} is not one of {', '.join(IMPORT_FORMATS)} — see `kdcache import --help`")
    if fmt != "tinyvit" and config is not None:
        raise InvalidSpec(f"--source-config is TinyViT's config file; {fmt} keeps its configuration beside its files — drop it")
    source = data.open_source(dataset)
    found = tinyvit.plan(src, source, config) if fmt == "tinyvit" else mldr.plan(src, source)
    return write_import(found, source, out, progress)
