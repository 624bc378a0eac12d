"""Reading the small text files users and other systems hand kdcache — ``--config`` files, TinyViT's
config.json (YAML), alias files — within limits, so a hostile one is one line instead of a crash or a
memory bomb: at most :data:`MAX_TEXT_BYTES`, nested at most :data:`MAX_DEPTH` deep, and YAML without
anchors or aliases (the "billion laughs" expands a few lines into billions of nodes; no config needs them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcache.errors import InvalidSpec
from kdcache.extras import require
from kdcache.locations import file_size

MAX_TEXT_BYTES = 1 << 20
MAX_DEPTH = 64


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a ``what``), refused beyond :data:`MAX_TEXT_BYTES` or when not UTF-8."""
    file_size(path, what, MAX_TEXT_BYTES, "MAX_TEXT_BYTES")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidSpec(f"{what} {path} is not UTF-8 text — pass the configuration file itself") from None


def parse_json(text: str, what: str) -> Any:
    """``text`` as JSON, nested at most :data:`MAX_DEPTH` deep; InvalidSpec naming ``what`` otherwise."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidSpec(f"{what} is not JSON ({type(exc).__name__}) — it is damaged") from None
    check_depth(value, what)
    return value


def parse_yaml(text: str, what: str) -> Any:
    """``text`` as YAML (safe types only, no anchors or aliases), nested at most :data:`MAX_DEPTH` deep."""
    yaml = require("yaml", "yaml", "YAML files")

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
                raise InvalidSpec(f"{what} uses YAML anchors or aliases, which kdcache does not expand — write the "
                                  "values out")
            return super().compose_node(parent, index)

    try:
        value = yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader without anchors
    except (yaml.YAMLError, RecursionError) as exc:
        raise InvalidSpec(f"{what} is not YAML ({type(exc).__name__}) — it is damaged") from None
    check_depth(value, what)
    return value


def check_depth(value: Any, what: str) -> None:
    """InvalidSpec when ``value``'s containers nest deeper than :data:`MAX_DEPTH`."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidSpec(f"{what} nests deeper than {MAX_DEPTH} levels (MAX_DEPTH) — it is damaged")
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]
