"""``kdcache`` console entry point: library errors become one-line messages and exit code 2."""

from __future__ import annotations

import sys
import warnings

import typer

try:  # typer >= 0.24 vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on plain click
    from click.exceptions import NoArgsIsHelpError, UsageError

from kdcache.errors import KdcacheError
from kdcache_cli import stages, cache, interop, registry, report  # noqa: F401, I001  (importing registers commands: this order is --help's)
from kdcache_cli.app import app, fail
from kdcache_cli.config import with_config

for _command in app.registered_commands:
    _command.callback = with_config(_command.callback)


def _warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - formatwarning's signature
    return f"warning: {message}\n"


def main() -> None:
    """Console entry point: library errors and usage errors become one-line messages and exit code 2; the
    library's warnings one ``warning:`` line each."""
    warnings.formatwarning = _warning
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError:  # the help is printed already
        raise SystemExit(2) from None
    except UsageError as exc:
        fail(_usage(exc))
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("Interrupted — rerun the same command to resume.", err=True)
        raise SystemExit(130) from None
    except KdcacheError as exc:
        fail(_one_line(str(exc)))
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _usage(exc: UsageError) -> str:
    """Click's usage error as ``what — see kdcache CMD --help``."""
    what = " ".join(exc.format_message().split()).rstrip(".")
    command = exc.ctx.command_path if exc.ctx is not None else "kdcache"
    return f"{what} — see `{command} --help`"


def _one_line(message: str) -> str:
    """A library error re-raised by a DataLoader worker carries the worker's traceback: keep its message."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.startswith("kdcache.errors.") else last


if __name__ == "__main__":
    sys.exit(main())
