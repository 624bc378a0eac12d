"""``kdcache`` console entry point: library errors become one-line messages and exit code 2."""

from __future__ import annotations

import sys

import typer

from kdcache.errors import KdcacheError
from kdcache_cli import stages, cache, registry, report  # noqa: F401, I001  (importing registers commands: this order is --help's)
from kdcache_cli.app import app, fail
from kdcache_cli.config import with_config

for _command in app.registered_commands:
    _command.callback = with_config(_command.callback)


def main() -> None:
    """Console entry point: library errors become one-line messages and exit code 2."""
    try:
        app()
    except KdcacheError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("Interrupted — rerun the same command to resume.", err=True)
        raise SystemExit(130)


if __name__ == "__main__":
    sys.exit(main())
