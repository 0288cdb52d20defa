"""The layers, enforced by parsing every import (module level, inside functions and under
TYPE_CHECKING alike), as docs/architecture.md draws them:

    contracts (bench.core) ← adversary library (bench.adversary) ← store (bench.store)
        ← engine (bench.engine) ← application (bench.app) ← the Python API (atbench)

Plugins (`attacks`, `defenses`, `bench.checks`, `bench.remedies`) import only the contracts and
the adversary library, never each other and never the engine; nothing imports a plugin module (registries load
them by name). And no two bench modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ("attacks", "defenses", "bench.checks", "bench.remedies")
ALLOWED = {  # layer -> the layers its modules may import (besides the standard library and third parties)
    "bench.core": {"bench.core"},
    "bench.adversary": {"bench.core", "bench.adversary"},
    "bench.store": {"bench.core", "bench.store"},
    "bench.engine": {"bench.core", "bench.adversary", "bench.store", "bench.engine"},
    "bench.app": {"bench.core", "bench.adversary", "bench.store", "bench.engine", "bench.app"},
    "attacks": {"bench.core", "bench.adversary"},
    "defenses": {"bench.core", "bench.adversary"},
    "bench.checks": {"bench.core", "bench.adversary"},
    "bench.remedies": {"bench.core", "bench.adversary"},
    "atbench": {"bench.app"},  # the public Python API: re-exports bench.app.api
}
OURS = ("atbench", "bench", "attacks", "defenses")


def modules() -> dict[str, Path]:
    out = {}
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if "migrations" in parts:
                continue  # Alembic scripts: they read the schema at the revision they describe
            out[".".join(parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, anywhere in it."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known)
            found.update(submodules or {node.module})  # `from bench import adversary` imports bench.adversary
    return {name for name in found if name.split(".")[0] in OURS and name in known}


def layer(module: str) -> str:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return module  # bench, bench.__main__: the entry points


MODULES = modules()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in ALLOWED))
def test_module_imports_only_the_layers_below(module):
    own = layer(module)
    for target in imports(MODULES[module]):
        assert layer(target) in ALLOWED[own], f"{module} ({own}) imports {target} ({layer(target)})"
        if own in PLUGINS and layer(target) == own:
            assert False, f"plugin {module} imports another plugin module {target}"


def test_nothing_imports_a_plugin_module():
    for module, path in MODULES.items():
        for target in imports(path):
            if layer(target) in PLUGINS and layer(module) != layer(target):
                raise AssertionError(f"{module} imports the plugin module {target}")


def test_no_import_cycles():
    graph = {m: {t for t in imports(p) if t in MODULES and t != m and not m.startswith(t + ".")}
             for m, p in MODULES.items()}
    # a package's __init__ importing its own modules (plugins' auto-import is dynamic) is no cycle
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(trail[trail.index(nxt):] + [node, nxt]
                                                                  if nxt in trail else trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_every_layer_is_a_visible_package():
    for package in ("core", "adversary", "store", "engine", "app", "checks", "remedies"):
        assert (ROOT / "bench" / package / "__init__.py").is_file()
    assert {p.name for p in (ROOT / "bench").glob("*.py")} == {"__init__.py", "__main__.py"}


def test_only_the_store_speaks_sql():
    """One persistence boundary: no module outside bench.store imports SQLAlchemy or Alembic."""
    for module, path in MODULES.items():
        if layer(module) == "bench.store":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("sqlalchemy", "alembic") for n in names), module


def test_toml_is_read_through_the_python_310_fallback():
    """Python 3.10 has no tomllib (the tomli package stands in, bench.core.config picks it): every
    other module gets its TOML parser from there, so `make bench` runs on 3.10 as the README says."""
    for module, path in MODULES.items():
        if module == "bench.core.config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {"tomllib", "tomli"} & {n.split(".")[0] for n in names}, \
                f"{module} imports tomllib directly; use `from bench.core.config import tomllib`"
