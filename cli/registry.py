"""Commands that list what kdcache's registries hold."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kdcache_cli.app import app, print_rows


@app.command()
def datasets() -> None:
    """List the dataset specs kdcache understands."""
    from kdcache import data

    print_rows(data.available())


@app.command()
def models() -> None:
    """List the model specs kdcache understands."""
    from kdcache import models as registry

    print_rows(registry.available())


@app.command("losses")
def list_losses() -> None:
    """List the distillation losses: name, teacher inputs needed, scope, defaults, source, and what a
    sparse (top-k or sampled) cache gives each loss that reads the teacher's distribution."""
    from kdcache import losses

    for cls in losses.available():
        needs = ",".join(sorted(cls.needs)) or "none"
        defaults = " ".join(f"{k}={v}" for k, v in cls.defaults.items())
        typer.echo(f"{cls.name:<11} needs={needs:<20} scope={cls.scope:<6} {defaults}  [{cls.source}]")
        if cls.sparse:
            typer.echo(f"{'':<11} sparse caches: {cls.sparse}")


@app.command()
def layers(
    model: Annotated[str, typer.Argument(help="Model spec, e.g. resnet32x4 or torchvision:resnet18.")],
    dataset: Annotated[str, typer.Option(help="Dataset whose classes, channels and size shape the model.")] = "mnist5k",
    size: Annotated[Optional[int], typer.Option(help="Input side in pixels (default: the weights' input size, else the dataset's).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Zoo weights (torchvision:TAG or pretrained) for a pretrained model's own class count and input size; hf:PATH needs none.")] = None,
) -> None:
    """List a model's named layers and their output shapes (names usable for feature outputs)."""
    from kdcache import data
    from kdcache import models as registry
    from kdcache.models import is_zoo_reference, load_model

    source = data.open_source(dataset)
    channels, side = source.channels, size or source.image_size
    if is_zoo_reference(model, weights):
        loaded = load_model(model, weights, source.num_classes, 3)  # pretrained models take RGB
        net, channels = loaded.module, 3
        side = size or (loaded.preprocess.size if loaded.preprocess is not None else side)
    else:
        net = registry.create_model(model, source.num_classes, source.channels)
    print_rows([(name, "x".join(map(str, shape))) for name, shape in
           registry.list_layers(net, (channels, side, side))])
