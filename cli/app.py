"""The Typer application and what every command module shares: one-line errors, small printers."""

from __future__ import annotations

import typer

from kdcache.errors import InvalidSpec

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


def parse_params(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidSpec(f"--loss-param {pair!r} is not KEY=VALUE — e.g. --loss-param T=4")
        out[key.strip()] = value.strip()
    return out


def print_rows(rows: list[tuple[str, ...]]) -> None:
    width = max((len(r[0]) for r in rows), default=0)
    for first, *rest in rows:
        typer.echo(f"{first:<{width}}  {'  '.join(rest)}")
