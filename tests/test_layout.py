"""The package layout keeps its promises: imports point one way, with no cycle and no private name
crossing a module boundary (../shared/design.md, docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kdcache

ROOT = Path(kdcache.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("kdcache", *path.relative_to(ROOT).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) of every import in the module, function-local ones too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in _imports(name, path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name and candidate != "kdcache":
                    graph[name].add(candidate)
    return graph


def test_no_kdcache_module_imports_itself_back_through_others():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


STAGES = ("kdcache.teacher", "kdcache.student", "kdcache.audit", "kdcache.interop")


def test_imports_point_one_way_between_the_packages():
    rules = {
        "kdcache.cache": STAGES,
        "kdcache.data": STAGES,
        "kdcache.models": STAGES,
        "kdcache.interop": ("kdcache.teacher", "kdcache.student", "kdcache.audit"),
        "kdcache.student": ("kdcache.teacher", "kdcache.audit", "kdcache.interop"),
        "kdcache.teacher": ("kdcache.student", "kdcache.audit", "kdcache.interop"),
    }
    floor = ("kdcache.errors", "kdcache.checks", "kdcache.extras", "kdcache.locations", "kdcache.data",
             "kdcache.models", "kdcache.augment", "kdcache.views",
             "kdcache.losses", "kdcache.distributed", "kdcache.runtime")
    bad = []
    for name, targets in _graph().items():
        for package, banned in rules.items():
            if name == package or name.startswith(package + "."):
                bad += [f"{name} -> {t}" for t in targets if t.startswith(banned)]
        if name.startswith(floor):
            bad += [f"{name} -> {t}" for t in targets if not t.startswith(floor)]
    assert not bad


def test_only_the_cache_package_touches_zarr():
    users = {name for name, path in _modules().items()
             if any(target.split(".")[0] == "zarr" for target, _ in _imports(name, path))}
    assert users and all(name.startswith("kdcache.cache.") for name in users), sorted(users)


def test_no_private_name_is_imported_from_another_module():
    cli = {f"kdcache_cli.{p.stem}": p for p in (ROOT.parent / "cli").glob("*.py")}
    crossing = [f"{name}: {target}.{n}" for name, path in {**_modules(), **cli}.items()
                for target, names in _imports(name, path) if target.startswith("kdcache")
                for n in names if n.startswith("_") and not n.endswith("__")]
    assert not crossing


def test_the_student_stage_loads_without_the_teacher_stage():
    code = ("import sys, kdcache.student.train, kdcache.student.reader, kdcache.student.extra_views; "
            "from kdcache import TrainConfig, train, loader, open_cache; "
            "print(sorted(m for m in sys.modules if m.startswith('kdcache.teacher') or m == 'kdcache.audit'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_function_in_the_library_is_longer_than_60_lines():
    """Each step reads at once (docs/contributing.md): a function past 60 lines is split along its seams."""
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"split these: {', '.join(long)}"


def test_no_module_of_the_library_is_longer_than_400_lines():
    """Every room stays small enough to change: one concept per module (../shared/style.md)."""
    big = [f"{name} ({n})" for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400]
    assert not big, f"split these: {', '.join(big)}"


def test_zarrs_private_modules_are_used_in_one_place():
    """zarr's public API everywhere; its private ``zarr.core`` only in kdcache/cache/storage.py's ``run``."""
    users = {name for name, path in _modules().items()
             if any(target.startswith("zarr.core") for target, _ in _imports(name, path))}
    assert users == {"kdcache.cache.storage"}, sorted(users)


def test_the_data_and_models_packages_import_without_torch():
    """Their ``__init__`` and the spec grammar are torch-free: a wrong --dataset is refused before torch loads."""
    code = ("import sys, kdcache.data, kdcache.models, kdcache.data.spec, kdcache.models.preprocess; "
            "kdcache.data.parse('wds:x-{0..3}.tar?image=jpg'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_moved_modules_still_import_with_a_deprecation_warning():
    import importlib
    import warnings

    for old, new in kdcache.MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new) and module.__spec__.name == new
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
