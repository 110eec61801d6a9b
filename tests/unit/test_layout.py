"""The layout: each folder one job, every import pointing down, no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import cxrtrek

ROOT = Path(cxrtrek.__file__).parent
# a floor may import its own floor and those below it, never one above
FLOORS = {
    "cxrtrek.graph": {"cxrtrek.agent", "cxrtrek.interfaces", "cxrtrek.serve"},
    "cxrtrek.model": {"cxrtrek.agent", "cxrtrek.interfaces", "cxrtrek.serve", "cxrtrek.graph",
                      "cxrtrek.backends", "cxrtrek.evals"},
    "cxrtrek.memory": {"cxrtrek.agent", "cxrtrek.interfaces", "cxrtrek.serve"},
    "cxrtrek.backends": {"cxrtrek.agent", "cxrtrek.interfaces", "cxrtrek.serve"},
    "cxrtrek.serve": {"cxrtrek.agent", "cxrtrek.interfaces"},
    "cxrtrek.agent": {"cxrtrek.interfaces", "cxrtrek.serve"},
    "cxrtrek.evals": {"cxrtrek.interfaces", "cxrtrek.serve"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.Module, top_level_only: bool) -> list[ast.AST]:
    """The tree's nodes, less ``if TYPE_CHECKING:`` blocks (they never run)."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and (
                node.test.id == "TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        out.append(node)
        if not top_level_only:
            todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path, *, top_level_only: bool, typing: bool = True) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = list(ast.walk(tree)) if typing else _runtime_nodes(tree, top_level_only)
    if typing and top_level_only:
        nodes = tree.body
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("cxrtrek")}


MODULES = {_module(p): p for p in ROOT.rglob("*.py")}


def test_every_import_points_down() -> None:
    wrong = []
    for name, path in sorted(MODULES.items()):
        for floor, above in FLOORS.items():
            if name == floor or name.startswith(floor + "."):
                wrong += [f"{name} imports {m}" for m in sorted(_imports(path,
                          top_level_only=False)) if any(m == a or m.startswith(a + ".")
                                                         for a in above)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle() -> None:
    # imports inside functions count too: a lazy import back is still a circle
    graph = {name: {m for m in _imports(path, top_level_only=False, typing=False)
                     if m in MODULES} - {name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_things_defined_once() -> None:
    sources = {name: path.read_text() for name, path in MODULES.items()}
    assert [n for n, s in sources.items() if "\ndef load_backend(" in s] == [
        "cxrtrek.backends.registry"]
    assert [n for n, s in sources.items() if "\nDEFAULT_SYSTEM_PROMPT =" in s] == [
        "cxrtrek.prompts"]
