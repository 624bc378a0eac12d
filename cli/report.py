"""``kdcache report``: plots and tables of training runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcache_cli.app import app


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by `kdcache train --out`.")],
    out: Annotated[Path, typer.Option(help="Directory for runs.md, curves.png and energy.png.")] = Path("report"),
    cache: Annotated[Optional[str], typer.Option(help="Also plot this cache's teacher-energy histogram.")] = None,
) -> None:
    """Plot several runs' train/test curves on one chart and tabulate their final metrics (markdown)."""
    from kdcache.report import write_report
    from kdcache.cache.store import open_cache

    for path in write_report(runs, out, open_cache(cache) if cache else None):
        typer.echo(str(path))
