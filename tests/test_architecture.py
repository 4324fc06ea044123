"""The package's layering, read from the source: cli -> pipeline -> storage -> errors, stage 2 apart
from stage 1, storage without torch, and no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "logitcache"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """module -> the modules it imports (anywhere in the file, including inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = _module(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[mod] = deps
    return graph


GRAPH = _imports()


def _offenders(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")
                  for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("layer, forbidden", [
    ("logitcache.storage", ("logitcache.pipeline", "logitcache.cli", "torch")),
    ("logitcache.pipeline", ("logitcache.cli",)),
    ("logitcache.errors", ("logitcache.storage", "logitcache.pipeline", "logitcache.cli")),
    ("logitcache.pipeline.student", ("logitcache.pipeline.teacher",)),
    ("logitcache.pipeline.teacher", ("logitcache.pipeline.student",)),
])
def test_nothing_imports_upward_or_across_stages(layer: str, forbidden: tuple[str, ...]) -> None:
    assert _offenders(layer, forbidden) == []


def find_circles(edges: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the circle it closes."""
    circles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return circles


def test_the_circle_finder_finds_a_circle() -> None:
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]


def test_no_import_circles() -> None:
    # Edges between modules of the package ("a.b.c" imported as a name of "a.b" is "a.b"), leaving
    # out a package and its own submodules: an __init__ that re-exports is not a circle.
    related = lambda m, d: d.startswith(m + ".") or m.startswith(d + ".")  # noqa: E731
    edges = {m: {d for d in (x if x in GRAPH else x.rsplit(".", 1)[0] for x in deps)
                 if d in GRAPH and d != m and not related(m, d)}
             for m, deps in GRAPH.items()}
    assert find_circles(edges) == []
