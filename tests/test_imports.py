"""The import graph of pyro_perturb has no cycle.

The graph is read from the source with ``ast`` (nothing is imported). Nodes are the
package's modules (a package is its ``__init__``). An edge ``a -> b`` is an import of
``b`` anywhere in ``a``:

* absolute (``pyro_perturb.x``) or relative (``.x``, ``..x``) imports, at module level
  and inside functions alike: an import deferred into a function is still a dependency
  (one such pair, ``evaluate.ate`` -> ``evaluate.ppc`` -> ``evaluate.ate``, was a cycle),
  and deferring imports must not be a way around this test; deferring a heavy
  third-party import (matplotlib) is fine, it is not an edge;
* ``from p import name`` points at the module ``p.name`` when there is one, else at ``p``;
* importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``: edges to those
  packages too, except the importer's own enclosing packages (they are already being
  imported when the importer runs).

Left out: ``if TYPE_CHECKING:`` blocks (never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pyro_perturb

PACKAGE = Path(pyro_perturb.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """``dotted name -> (file, is_package)`` of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _imports(node: ast.AST):
    """Every import statement under ``node``, except in ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _imports(child)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in modules else source)
        edges = set()
        for target in targets:
            if target not in modules:
                continue  # outside the package
            edges.add(target)
            edges.update(a for a in _ancestors(target) if a not in _ancestors(name) and a != name)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read():
    """Relative, absolute, ``from . import module``, in-function and implicit package
    edges are seen."""
    graph = import_graph()
    assert "pyro_perturb.evaluate" in graph["pyro_perturb.run"]  # inside Run.evaluate
    assert "pyro_perturb.evaluate.ate" in graph["pyro_perturb.evaluate"]  # from .ate import ...
    assert "pyro_perturb.normalize" in graph["pyro_perturb.data.simulate"]  # absolute
    assert "pyro_perturb.data.anndata" in graph["pyro_perturb.evaluate.ate"]  # from ..data.anndata import
    assert "pyro_perturb.data" in graph["pyro_perturb.evaluate.ate"]  # runs data/__init__ first
    assert "pyro_perturb.data.simulate" in graph["pyro_perturb.data"]  # from . import simulate


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_pyro_perturb():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
