"""``kdcache`` commands. Each parses its options, calls the library, and prints; nothing more."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcache.errors import InvalidSpec, KdcacheError

app = typer.Typer(
    name="kdcache",
    help="Run a costly teacher once, cache its outputs in Zarr, train many students from the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str) -> None:
    """Print ``Error: <message>`` on one line to stderr and exit with status 2."""
    typer.echo(f"Error: {message}", err=True)
    raise SystemExit(2)


def main() -> None:
    """Console entry point: library errors become one-line messages and exit code 2."""
    try:
        app()
    except KdcacheError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("Interrupted — rerun the same command to resume.", err=True)
        raise SystemExit(130)


def _params(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidSpec(f"--loss-param {pair!r} is not KEY=VALUE — e.g. --loss-param T=4")
        out[key.strip()] = value.strip()
    return out


def _rows(rows: list[tuple[str, ...]]) -> None:
    width = max((len(r[0]) for r in rows), default=0)
    for first, *rest in rows:
        typer.echo(f"{first:<{width}}  {'  '.join(rest)}")


# ---- registries ------------------------------------------------------------------------------
@app.command()
def datasets() -> None:
    """List the dataset specs kdcache understands."""
    from kdcache import data

    _rows(data.available())


@app.command()
def models() -> None:
    """List the model specs kdcache understands."""
    from kdcache import models as registry

    _rows(registry.available())


@app.command("losses")
def list_losses() -> None:
    """List the distillation losses: name, teacher inputs needed, scope, defaults, source."""
    from kdcache import losses

    for cls in losses.available():
        needs = ",".join(sorted(cls.needs)) or "none"
        defaults = " ".join(f"{k}={v}" for k, v in cls.defaults.items())
        typer.echo(f"{cls.name:<11} needs={needs:<20} scope={cls.scope:<6} {defaults}  [{cls.source}]")


@app.command()
def layers(
    model: Annotated[str, typer.Argument(help="Model spec, e.g. resnet32x4 or torchvision:resnet18.")],
    dataset: Annotated[str, typer.Option(help="Dataset whose classes, channels and size shape the model.")] = "mnist5k",
    size: Annotated[Optional[int], typer.Option(help="Input side in pixels (default: the dataset's).")] = None,
) -> None:
    """List a model's named layers and their output shapes (names usable for feature outputs)."""
    from kdcache import data
    from kdcache import models as registry

    source = data.open_source(dataset)
    net = registry.create_model(model, source.num_classes, source.channels)
    side = size or source.image_size
    _rows([(name, "x".join(map(str, shape))) for name, shape in
           registry.list_layers(net, (source.channels, side, side))])


# ---- stages ----------------------------------------------------------------------------------
@app.command()
def precompute(
    dataset: Annotated[str, typer.Option(help="Dataset spec (see `kdcache datasets`).")],
    teacher: Annotated[str, typer.Option(help="Teacher model spec (see `kdcache models`).")],
    weights: Annotated[Path, typer.Option(help="Teacher weights file (a state dict; loaded weights_only).")],
    out: Annotated[str, typer.Option(help="Cache location: a directory or an fsspec URL.")],
    views: Annotated[int, typer.Option(help="Recorded augmented views per sample (K).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the view plan; params are a pure function of (seed, i, v).")] = 0,
    augment: Annotated[str, typer.Option(help="Augmentation recipe, ops joined by '+'.")] = "rrc+flip",
    teacher_size: Annotated[Optional[int], typer.Option(help="Teacher input side in pixels (default: the dataset's).")] = None,
    energy_t: Annotated[Optional[list[float]], typer.Option(help="Energy temperature; repeat for several.")] = None,
    logit_dtype: Annotated[str, typer.Option(help="Stored logit dtype: float16, bfloat16 or float32.")] = "float16",
    batch_size: Annotated[int, typer.Option(help="Teacher batch size (views per forward pass).")] = 256,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes rendering views (0: in-process).")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda[:N].")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Stage 1: run the teacher over K recorded views per sample and write the Zarr v3 cache."""
    from kdcache.precompute import PrecomputeConfig
    from kdcache.precompute import precompute as run

    result = run(PrecomputeConfig(
        dataset=dataset, teacher=teacher, weights=str(weights), out=out, views=views, seed=seed, augment=augment,
        teacher_size=teacher_size, energy_t=tuple(energy_t or (1.0, 4.0)), logit_dtype=logit_dtype,
        batch_size=batch_size, workers=workers, device=device, progress=not quiet))
    if result.reused:
        typer.echo(f"reusing complete cache {result.cache_id} at {result.path} (no teacher forward run)")
    else:
        typer.echo(f"cache {result.cache_id} written to {result.path}: {result.views_computed} views in "
                   f"{result.seconds:.1f} s ({result.views_per_second:.0f} views/s)")


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="Dataset spec; must be the one the cache was made from.")],
    model: Annotated[str, typer.Option(help="Student model spec (see `kdcache models`).")],
    out: Annotated[Path, typer.Option(help="Run directory: model.pt, checkpoint.pt, metrics.jsonl, run.json.")],
    cache: Annotated[Optional[str], typer.Option(help="Cache to distil from; without it, plain CE training.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Loss name (see `kdcache losses`); default kd with a cache, ce without.")] = None,
    loss_param: Annotated[Optional[list[str]], typer.Option("--loss-param", "-p", help="Loss hyper-parameter KEY=VALUE; repeatable.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs; with a cache each epoch uses one stored view per sample.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Batch size (per process).")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.05,
    optimizer: Annotated[str, typer.Option(help="sgd (Nesterov, momentum 0.9) or adamw.")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="cosine, step (x0.1 at 30/60/90%) or constant.")] = "cosine",
    warmup_epochs: Annotated[int, typer.Option(help="Linear warm-up epochs.")] = 0,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip gradient norm to this value.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and, without a cache, of the views.")] = 0,
    size: Annotated[Optional[int], typer.Option(help="Student input side (default: the cache's teacher size).")] = None,
    augment: Annotated[str, typer.Option(help="Recipe without a cache (a cache replays its own).")] = "rrc+flip",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda[:N].")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Stage 2: train a student from a cache (teacher never loaded), or alone with cross-entropy."""
    from kdcache.train import TrainConfig
    from kdcache.train import train as run

    result = run(TrainConfig(
        dataset=dataset, model=model, out=str(out), cache=cache, loss=loss, loss_params=_params(loss_param),
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        schedule=schedule, warmup_epochs=warmup_epochs, grad_clip=grad_clip, seed=seed, size=size,
        augment=augment, workers=workers, device=device, resume=resume, progress=not quiet))
    for m in result.metrics:
        typer.echo(f"epoch {m['epoch']:>3}  loss {m['loss']:.4f}  train top-1 {m['train_top1']:6.2f}  "
                   f"test top-1 {m['test_top1']:6.2f}  {m['images_per_s']:7.0f} img/s", err=True)
    final = result.final
    typer.echo(f"{model} on {dataset}: test top-1 {final['test_top1']:.2f}%  top-5 {final['test_top5']:.2f}%  "
               f"ECE {final['test_ece']:.4f}  → {out / 'model.pt'}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Model spec.")],
    weights: Annotated[Path, typer.Option(help="Weights file (state dict).")],
    dataset: Annotated[str, typer.Option(help="Dataset spec.")],
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
    size: Annotated[Optional[int], typer.Option(help="Input side in pixels (default: the dataset's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Evaluate weights on a split: top-1, top-5 (%) and ECE (15 bins)."""
    from kdcache.train import evaluate_weights

    result = evaluate_weights(model, str(weights), dataset, split, size, batch_size, device)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{model} on {dataset}/{split}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                   f"ECE {result['ece']:.4f}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Directory for the teacher, cache and students.")] = Path("quickstart"),
    dataset: Annotated[str, typer.Option(help="Dataset spec.")] = "mnist5k",
    teacher: Annotated[str, typer.Option(help="Teacher model spec.")] = "resnet32x4",
    student: Annotated[str, typer.Option(help="Student model spec.")] = "resnet8x4",
    size: Annotated[int, typer.Option(help="Input side in pixels for teacher and student.")] = 16,
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = 3,
    epochs: Annotated[int, typer.Option(help="Student epochs (same for both students).")] = 3,
    views: Annotated[int, typer.Option(help="Views per sample in the cache.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Teacher → cache → student alone vs. from the cache, on built-in data; prints a table."""
    from kdcache.quickstart import QuickstartConfig, run_quickstart, table

    stages = run_quickstart(
        QuickstartConfig(out=str(out), dataset=dataset, teacher=teacher, student=student, size=size,
                         teacher_epochs=teacher_epochs, student_epochs=epochs, views=views, seed=seed,
                         progress=not quiet),
        log=lambda msg: typer.echo(msg, err=True))
    typer.echo(table(stages))


@app.command()
def info(
    cache: Annotated[str, typer.Argument(help="Cache path or URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show a cache's manifest: teacher, dataset, recipe, outputs, status."""
    from kdcache.store import open_cache

    c = open_cache(cache, allow_incomplete=True)
    if as_json:
        typer.echo(json.dumps(c.manifest, indent=2))
        return
    m = c.manifest
    members = ", ".join(f"{t['spec']} ({t['sha256'][:19]}…)" for t in m["teacher"]["members"])
    done = int(c.shards_done().sum())
    typer.echo(f"cache {c.id} at {c.path}  format {m['format_version']}  status {m['status']} "
               f"({done}/{c.num_shards} shards)")
    typer.echo(f"teacher   {members}")
    typer.echo(f"dataset   {m['dataset']['spec']} train split: {c.num_samples} samples, "
               f"{c.num_classes} classes, {m['dataset']['fingerprint'][:23]}…")
    typer.echo(f"recipe    {m['recipe']['augment']['spec']}  views {c.views}  seed {m['recipe']['seed']}  "
               f"input {m['recipe']['input_size']}px")
    typer.echo(f"outputs   logits {m['outputs']['logits']['mode']}/{m['outputs']['logits']['dtype']}  "
               f"energy T={m['outputs']['energy']['temperatures']}")
    p = m["provenance"]
    typer.echo(f"made by   kdcache {p['kdcache']}, torch {p['torch']}, zarr {p['zarr']} on {p['host']} "
               f"at {p['created']}")


if __name__ == "__main__":
    sys.exit(main())
