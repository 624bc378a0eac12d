"""The docs stay true: the generated CLI reference matches the CLI, and every doc link resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_matches_the_commands():
    typer_cli = Path(sys.executable).parent / "typer"
    generated = subprocess.run(
        [str(typer_cli), "kdcache_cli.main", "utils", "docs", "--name", "kdcache",
         "--title", "kdcache command reference"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    stored = (ROOT / "docs" / "cli-reference.md").read_text()
    assert generated.strip() == stored.strip(), "docs/cli-reference.md is stale — run `make docs`"


def test_relative_links_in_docs_and_readme_point_to_files():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
