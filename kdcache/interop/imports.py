"""``kdcache import``: pick the format module, open the dataset, write the cache."""

from __future__ import annotations

from kdcache import checks, data
from kdcache.cache.claim import ClaimOptions
from kdcache.errors import InvalidSpec
from kdcache.interop import IMPORT_FORMATS, fkd, mldr, tinyvit
from kdcache.interop.imported import ImportResult, write_import

#: ``--pillow-order``: the passes of the source's Pillow resizes (kdcache.augment.op.PASSES).
PILLOW_ORDERS = {"legacy": 2, "installed": 1}


def import_cache(fmt: str, src: str, dataset: str, out: str, config: str | None = None,
                 progress: bool = True, options: ClaimOptions = ClaimOptions(),
                 randaugment_on: str | None = None, pillow_order: str = "legacy") -> ImportResult:
    """Import the files ``src`` of format ``fmt`` (see :data:`IMPORT_FORMATS`) made over ``dataset`` as a cache
    under root ``out``; a complete cache of the same content there is reused. ``config`` is TinyViT's config or
    FKD's generator arguments;
    ``options`` say how to claim the cache (``--wait``, ``--break-lock``, ``--rebuild``: kdcache/cache/claim.py);
    ``randaugment_on`` (ml-dr: ``pil``, the default, or ``tensor``) which of its renderings RandAugment replays;
    ``pillow_order`` how the source's Pillow resized: ``legacy`` (Pillow 9.5-12.2, the default: every published
    source) or ``installed`` (this machine's Pillow; see kdcache.augment.op.PASSES)."""
    if fmt not in IMPORT_FORMATS:
        raise InvalidSpec(f"format {fmt!r} is not one of {', '.join(IMPORT_FORMATS)} — see `kdcache import --help`")
    if fmt == "ml-dr" and config is not None:
        raise InvalidSpec("--source-config names the run's settings for tinyvit and fkd; ml-dr keeps its configuration "
                          "beside its files — drop it")
    if fmt != "ml-dr" and randaugment_on is not None:
        raise InvalidSpec(f"--randaugment-on chooses between ml-dr's two renderings of RandAugment; {fmt} has one — "
                          "drop it")
    if pillow_order not in PILLOW_ORDERS:
        raise InvalidSpec(f"--pillow-order {pillow_order!r} is not one of {', '.join(PILLOW_ORDERS)}")
    passes = PILLOW_ORDERS[pillow_order]
    parsed = data.parse(dataset)
    checks.output_folder("--out", out)
    checks.outside("--out", out, parsed.local_root(), "the dataset")
    checks.outside("--out", out, src, "the source")
    source = data.open_source(parsed)
    if fmt == "tinyvit":
        found = tinyvit.plan(src, source, config, progress, passes)
    elif fmt == "fkd":
        found = fkd.plan(src, source, config, progress, passes)
    else:
        found = mldr.plan(src, source, progress, "pil" if randaugment_on is None else randaugment_on, passes)
    found.about["pillow_order"] = pillow_order
    try:
        return write_import(found, source, out, progress, options)
    finally:
        found.close()
