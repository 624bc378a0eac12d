"""``kdcache import``: pick the format module, open the dataset, write the cache."""

from __future__ import annotations

from kdcache import checks, data
from kdcache.cache.claim import ClaimOptions
from kdcache.errors import InvalidSpec
from kdcache.interop import IMPORT_FORMATS, mldr, tinyvit
from kdcache.interop.imported import ImportResult, write_import


def import_cache(fmt: str, src: str, dataset: str, out: str, config: str | None = None,
                 progress: bool = True, options: ClaimOptions = ClaimOptions()) -> ImportResult:
    """Import the files ``src`` of format ``fmt`` (see :data:`IMPORT_FORMATS`) made over ``dataset`` as a cache
    under root ``out``; a complete cache of the same content there is reused. ``config`` is TinyViT's config;
    ``options`` say how to claim the cache (``--wait``, ``--break-lock``, ``--rebuild``: kdcache/cache/claim.py)."""
    if fmt not in IMPORT_FORMATS:
        raise InvalidSpec(f"format {fmt!r} is not one of {', '.join(IMPORT_FORMATS)} — see `kdcache import --help`")
    if fmt != "tinyvit" and config is not None:
        raise InvalidSpec(f"--source-config is TinyViT's config file; {fmt} keeps its configuration beside its files — drop it")
    parsed = data.parse(dataset)
    checks.outside("--out", out, parsed.local_root(), "the dataset")
    checks.outside("--out", out, src, "the source")
    source = data.open_source(parsed)
    found = tinyvit.plan(src, source, config) if fmt == "tinyvit" else mldr.plan(src, source, progress)
    return write_import(found, source, out, progress, options)
