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


#: The options every cache writer takes (precompute, import, extend: kdcache/cache/claim.py), said once.
WAIT_HELP = "If another writer holds this cache, wait for it (polls every second) instead of stopping."
REBUILD_HELP = ("Delete whatever lies at OUT/<cache id> (a cache whose manifest, labels or array metadata is damaged) "
                "and write it anew.")
BREAK_LOCK_HELP = ("Remove the writer lock of a writer that is gone (no heartbeat for 60 s); a live writer's lock is "
                   "never removed.")


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


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows as left-aligned columns, the first row being the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def format_size(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
