"""Commands that bring other systems' teacher outputs in and take kdcache caches out: import, export."""

from __future__ import annotations

from typing import Annotated

import typer
from kdcache_cli.app import BREAK_LOCK_HELP, REBUILD_HELP, WAIT_HELP, app

from kdcache.interop import EXPORT_FORMATS, IMPORT_FORMATS

_IMPORTS = "; ".join(f"{name}: {about}" for name, about in IMPORT_FORMATS.items())


@app.command("import", help=f"""Import another system's cached teacher outputs as a kdcache cache (docs/interop.md).

Formats: {_IMPORTS}.

The cache goes to OUT/<cache id>, like a precompute's, with its views and top-k probabilities as the source stored
them, and trains with every logit loss. A source op kdcache cannot replay bit for bit is refused in one line.
Rerunning resumes an interrupted import, and reuses a complete one.""")
def import_cache(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help=f"One of: {', '.join(IMPORT_FORMATS)}.")],
    src: Annotated[str, typer.Argument(help="The source's folder (ml-dr: reinforced_data/; tinyvit: the "
                                            "DISTILL.TEACHER_LOGITS_PATH holding logits_top<K>_epoch<E>/; fkd: the "
                                            "--save_path of generate_soft_label.py).")],
    dataset: Annotated[str, typer.Option(help="The dataset the source was made over, e.g. imagefolder:/data/imagenet "
                                              "(sample indices are torchvision ImageFolder's order).")],
    out: Annotated[str, typer.Option(help="Root folder (or s3:// prefix) the cache is written under.")],
    source_config: Annotated[str | None, typer.Option(help="tinyvit: the config.json save_logits.py wrote (it says "
                                                    "which augmentation the seeds drew); fkd: a YAML/JSON of "
                                                    "generate_soft_label.py's arguments (input_size, min_scale_crops, "
                                                    "max_scale_crops, temp, label_type, arch, mean, std; its "
                                                    "defaults otherwise).")] = None,
    randaugment_on: Annotated[str | None, typer.Option(
        help="ml-dr only: where RandAugment is replayed. pil (default): on the PIL image, as ml-dr's reader renders "
             "it for the student it trains; tensor: on the uint8 tensor, as its writer rendered it for the teacher "
             "whose probabilities are stored (docs/interop.md).")] = None,
    pillow_order: Annotated[str, typer.Option(
        help="How the source's Pillow resized crops: legacy (default), horizontal then vertical as Pillow 9.5 to "
             "12.2 do, the order of every source published so far, replayed the same under any Pillow; installed, "
             "this machine's Pillow's own order (Pillow 13 takes some crops vertical first), for a source written "
             "with this Pillow.")] = "legacy",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help=WAIT_HELP)] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help=REBUILD_HELP)] = False,
    break_lock: Annotated[bool, typer.Option("--break-lock", help=BREAK_LOCK_HELP)] = False,
) -> None:
    from kdcache.cache.claim import ClaimOptions
    from kdcache.interop.imports import import_cache as run

    r = run(fmt, src, dataset, out, config=source_config, progress=not quiet,
            options=ClaimOptions(wait=wait, break_lock=break_lock, rebuild=rebuild), randaugment_on=randaugment_on,
            pillow_order=pillow_order)
    for note in r.notes:
        typer.echo(f"note: {note}", err=True)
    if r.reused:
        typer.echo(f"cache {r.cache_id} at {r.path} already holds this import — reused")
    else:
        typer.echo(f"cache {r.cache_id} written to {r.path}: {r.views} views imported from {fmt} in {r.seconds:.1f} s")
    typer.echo(f"alias {r.alias} — train with --cache {r.path}")


@app.command(help=f"""Write a top-k cache in another system's layout (docs/interop.md).

Formats: {'; '.join(f'{n}: {a}' for n, a in EXPORT_FORMATS.items())}. Sample indices follow torchvision's
ImageFolder order, pixel boxes each image's own size; importing the export gives the same arrays back.""")
def export(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help=f"One of: {', '.join(EXPORT_FORMATS)}.")],
    cache: Annotated[str, typer.Argument(help="A cache made with --logits topk:K.")],
    out: Annotated[str, typer.Argument(help="A new (or empty) folder to write into.")],
    dataset: Annotated[str | None, typer.Option(help="The cache's dataset, where it has moved (default: the spec "
                                                     "in its manifest).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    from kdcache.errors import InvalidSpec
    from kdcache.interop.mldr_export import export as run

    if fmt not in EXPORT_FORMATS:
        raise InvalidSpec(f"format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)} — see `kdcache export --help`")
    r = run(cache, out, dataset, progress=not quiet)
    typer.echo(f"{r.samples} samples x {r.views} views written to {r.out} in ml-dr's layout")
    if not r.exact:
        typer.echo("note: this cache's views are resized by torch (rrc); ml-dr's reader resizes with Pillow, so its "
                   "pixels differ by up to 2 levels of 255 — caches made with pilrrc export exactly")
