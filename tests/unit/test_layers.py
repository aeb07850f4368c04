"""The shape of include/: imports flow one way down the event's path, no circles, the tooling
(include/sandbox) is never imported by the product, and modules and functions stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

INCLUDE = Path(__file__).resolve().parents[2] / "include"
# an event's path, bottom to top: a module may import its own layer and the layers below it
LAYERS = (
    ("errors", "config", "runtime"),
    ("database",),
    ("resources",),  # what a task or command starts from: settings, config, a checked engine
    ("adobe",),
    ("staging",),
    ("audience",),
    ("suppressions", "bounces"),  # bounces records suppressions; matching and delivery read them
    ("matching",),
    ("delivery",),
    ("previews",),
    ("operations",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_MODULE_LINES = 550
MAX_FUNCTION_LINES = 60
ONE_PIECE = "one piece"  # a docstring that says why a longer function must stay whole


def product_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(INCLUDE.rglob("*.py")):
        parts = path.relative_to(INCLUDE.parent).with_suffix("").parts
        if "sandbox" in parts or "migrations" in parts:
            continue
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path) -> set[str]:
    """Every ``include.*`` module the file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("include"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("include"))
    return found


def layer_of(module: str) -> str:
    return module.split(".")[1]


MODULES = product_modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down_the_path_and_never_reach_the_sandbox(module: str) -> None:
    for imported in imports_of(MODULES[module]):
        if imported == "include":
            continue
        assert layer_of(imported) != "sandbox", f"{module} imports the tooling {imported}"
        assert RANK[layer_of(imported)] <= RANK[layer_of(module)], (
            f"{module} imports {imported}, a later stage"
        )


def test_no_import_circle_between_modules() -> None:
    graph = {
        name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()
    }
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(name) :], name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_readable(module: str) -> None:
    source = MODULES[module].read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{module} has {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            why = ONE_PIECE in (ast.get_docstring(node) or "")
            assert length <= MAX_FUNCTION_LINES or why, f"{module}.{node.name} has {length} lines"
