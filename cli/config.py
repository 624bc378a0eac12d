"""``--config FILE`` for every command: a TOML (or, with PyYAML, YAML) file whose keys are the command's
options. Values from the file become the options' defaults, so flags on the command line override them.
"""

from __future__ import annotations

import functools
import inspect
import tomllib
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from kdcache.errors import InvalidSpec, MissingData
from kdcache.extras import require
from kdcache.locations import guard
from kdcache.textfiles import check_depth, parse_yaml, read_text


def read_config(path: Path) -> dict[str, Any]:
    """The table of options in ``path``: TOML, or YAML for .yaml/.yml files."""
    guard(path, "config file")
    if not path.is_file():
        raise MissingData(f"config file {path} not found — check the path given to --config")
    text = read_text(path, "config file")
    if path.suffix in (".yaml", ".yml"):
        require("yaml", "yaml", "YAML config files (or use TOML)")
        values = parse_yaml(text, f"config file {path}") or {}
    else:
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidSpec(f"config file {path} is not valid TOML: {exc}") from None
        except RecursionError:
            raise InvalidSpec(f"config file {path} nests tables too deep — it is damaged") from None
        check_depth(values, f"config file {path}")
    if not isinstance(values, dict):
        raise InvalidSpec(f"config file {path} must hold a table of option = value pairs")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def _load(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    if value is None:
        return None
    values = read_config(value)
    known = {p.name for p in ctx.command.params if p.name != "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidSpec(
            f"config file {value} sets {', '.join(unknown)}, which `{ctx.command.name}` does not take — "
            f"its options are: {', '.join(sorted(known))}"
        )
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    values = {key: [v] if key in repeatable and not isinstance(v, list) else v for key, v in values.items()}
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def with_config(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` a ``--config FILE`` option whose values become its options' defaults."""
    if getattr(command, "takes_config", False):
        return command
    signature = inspect.signature(command, eval_str=True)
    option = inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Optional[Path],
            typer.Option("--config", is_eager=True, callback=_load,
                         help="TOML (or YAML) file of this command's options; flags override it."),
        ],
    )

    @functools.wraps(command)
    def wrapper(*args: Any, config: Optional[Path] = None, **kwargs: Any) -> Any:
        return command(*args, **kwargs)

    wrapper.takes_config = True
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), option])
    wrapper.__annotations__ = {**command.__annotations__, "config": option.annotation}
    return wrapper


def write_toml(values: dict[str, Any]) -> str:
    """A flat table of str/int/float/bool/list values as TOML (None values are left out)."""
    lines = []
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
