"""Helpers shared by test modules."""

from __future__ import annotations

import sys

from kdcache_cli.main import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``kdcache ARGV`` in-process; return (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["kdcache", *argv]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err
