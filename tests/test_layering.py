"""Imports go one way, server -> steering -> kernels, and no module of ours takes part in an import cycle.

Read statically: every module of the three packages is parsed with `ast`, never imported, and every import
statement counts, wherever it is (module level, inside a function, under `if TYPE_CHECKING:`). A relative or
absolute import of one of our modules is an edge to that module; `from pkg import name` is an edge to the
submodule `pkg.name` where one exists, else to `pkg` itself.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"steerserve.kernels": ROOT / "kernels", "steerserve.steering": ROOT / "steering",
            "steerserve.server": ROOT / "server"}
LAYER = {"steerserve.kernels": 0, "steerserve.steering": 1, "steerserve.server": 2}  # imports only go down


def discover() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the three package directories."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(our module, line) for each import of one of our modules in `name`'s source."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for target in targets:
            # `import steerserve.server.x.y` imports the longest prefix that is one of our modules.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                yield target, node.lineno


def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, over our modules only."""
    modules = discover()
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        out = edges.setdefault(name, {})
        for target, line in imported(name, path, modules):
            if target != name:
                out.setdefault(target, line)
    return edges


def layer_of(module: str) -> int:
    return next(LAYER[p] for p in LAYER if module == p or module.startswith(p + "."))


def upward_imports(edges: dict[str, dict[str, int]]) -> list[str]:
    return [f"{src} (line {line}) imports {dst}" for src, out in edges.items() for dst, line in out.items()
            if layer_of(dst) > layer_of(src)]


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [closed_path(sorted(c)[0], set(c), edges) for c in components]


def closed_path(start: str, members: set[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")


# ---- the checker itself, on made-up graphs and sources ---------------------------------------------------------

def test_the_checker_finds_upward_imports_and_cycles():
    edges = {"steerserve.kernels.a": {"steerserve.steering.b": 3}, "steerserve.steering.b": {},
             "steerserve.server.x": {"steerserve.server.y": 1}, "steerserve.server.y": {"steerserve.server.z": 2},
             "steerserve.server.z": {"steerserve.server.x": 5, "steerserve.steering.b": 9}}
    assert upward_imports(edges) == ["steerserve.kernels.a (line 3) imports steerserve.steering.b"]
    assert cycles(edges) == [["steerserve.server.x", "steerserve.server.y", "steerserve.server.z",
                              "steerserve.server.x"]]
    assert cycles({"steerserve.server.x": {"steerserve.server.y": 1}, "steerserve.server.y": {}}) == []


def test_the_checker_reads_lazy_relative_and_absolute_imports(tmp_path):
    modules = {"steerserve.steering": tmp_path / "__init__.py", "steerserve.steering.a": tmp_path / "a.py",
               "steerserve.steering.b": tmp_path / "b.py", "steerserve.server": tmp_path / "s.py",
               "steerserve.server.plugin": tmp_path / "p.py"}
    (tmp_path / "a.py").write_text(
        "import os\nfrom . import b\nfrom .b import thing\n\n"
        "def f():\n    from steerserve.server import plugin\n    import steerserve.server.plugin.sub\n")
    (tmp_path / "__init__.py").write_text("from .a import f\nfrom steerserve.server import name\n")
    got = list(imported("steerserve.steering.a", tmp_path / "a.py", modules))
    assert got == [("steerserve.steering.b", 2), ("steerserve.steering.b", 3), ("steerserve.server.plugin", 6),
                   ("steerserve.server.plugin", 7)]
    got = list(imported("steerserve.steering", tmp_path / "__init__.py", modules))
    assert got == [("steerserve.steering.a", 1), ("steerserve.server", 2)]


# ---- the real packages ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edges() -> dict[str, dict[str, int]]:
    found = graph()
    assert len(found) > 40 and all(layer_of(m) in (0, 1, 2) for m in found)
    assert sum(len(out) for out in found.values()) > 50  # the parser does see our imports
    return found


def test_imports_go_server_steering_kernels(edges):
    assert upward_imports(edges) == []


def test_no_import_cycles(edges):
    assert cycles(edges) == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles(edges))
