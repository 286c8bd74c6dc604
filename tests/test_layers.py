"""The package's floors, as its imports draw them (docs/architecture.md).

Each module of ``safeopt`` lives on one floor. A module imports from its own floor or below, never
from above, and never a name another module keeps private (a leading underscore). A new module
must be given a floor here: the test fails until it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safeopt"

FLOORS: dict[str, int] = {
    # 0: torch's internals behind one seam, and shared text
    "_torch_compat": 0,
    "_doc": 0,
    # 1: the rule: which parameters and rows take part (host and device decisions)
    "_device": 1,
    "_row_rule": 1,
    "_rule": 1,
    # 2: the step machinery that applies it
    "_freeze": 2,
    "_fresh": 2,
    "_rows": 2,
    "_capturable": 2,
    "_compiled": 2,
    "_amp": 2,
    "_lazy": 2,
    # 3: the public optimizers and wrap()
    "_optimizers": 3,
    "_wrap": 3,
    "_groups": 3,
    # 4: diagnostics and measurement
    "_watch": 4,
    "_audit": 4,
    "_scenarios": 4,
    "_bench": 4,
    "_observe": 4,
    "_script": 4,
    # 5: the demo, the command line and the package's face
    "_demo": 5,
    "_patch": 5,
    "__main__": 5,
    "__init__": 5,
}


def _module(path: Path) -> str:
    return path.stem


def _imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(safeopt module imported, names taken from it, line) for every import, nested ones included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "safeopt":
            parts = node.module.split(".")
            if len(parts) == 1:  # from safeopt import _rule, _rows
                out.extend((alias.name, [], node.lineno) for alias in node.names)
            else:
                out.append((parts[1], [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "safeopt" and len(parts) > 1:
                    out.append((parts[1], [], node.lineno))
    return out


def _attribute_reaches(tree: ast.AST, modules: set[str]) -> list[tuple[str, str, int]]:
    """``_module._private`` attribute reads of another safeopt module."""
    return [
        (node.value.id, node.attr, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]


SOURCES = sorted(PACKAGE.glob("*.py"))


def test_every_module_has_a_floor() -> None:
    unplaced = sorted({_module(p) for p in SOURCES} - set(FLOORS))
    assert not unplaced, f"give these modules a floor in tests/test_layers.py: {unplaced}"
    assert not set(FLOORS) - {_module(p) for p in SOURCES}, "FLOORS names a module that is gone"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_imports_go_down_and_take_no_private_names(path: Path) -> None:
    name = _module(path)
    tree = ast.parse(path.read_text())
    for target, names, line in _imports(tree):
        if target not in FLOORS:
            continue  # safeopt itself (the package), checked through its modules
        assert FLOORS[target] <= FLOORS[name], (
            f"{path.name}:{line} imports {target} (floor {FLOORS[target]}) from floor {FLOORS[name]}"
        )
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.name}:{line} takes private names {private} from {target}"
    reaches = _attribute_reaches(tree, set(FLOORS) - {name})
    assert not reaches, f"{path.name} reads private names of other modules: {reaches}"


def test_no_import_cycle_within_a_floor() -> None:
    graph = {
        _module(p): {t for t, _, _ in _imports(ast.parse(p.read_text())) if t in FLOORS and t != _module(p)}
        for p in SOURCES
    }
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            assert seen.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [])
