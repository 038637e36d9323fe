"""The import graph of src/stemedb has no cycle (issue 9: layers point one way).

Every module under src/stemedb is read with `ast` (nothing is imported), and
each import of another stemedb module becomes an edge: top-level and lazy
(inside a function) imports alike, whether written `import stemedb.x`,
`from stemedb import x`, `from stemedb.x import y` or relatively. A name
imported from a package counts as the submodule when there is one of that
name (`from stemedb import query` is an edge to stemedb.query), else as the
package itself. The compiled modules (stemedb._codec, …) have no Python
source here, only their .pyi stubs: they are modules too, and leaves.
"""

from __future__ import annotations

import ast
import pathlib
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PACKAGE = "stemedb"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_files() -> dict[str, pathlib.Path]:
    """Module name → source file, for every .py under src/stemedb."""
    return {module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def compiled_modules() -> set[str]:
    """The compiled modules, known by their type stubs (a .pyi without a .py beside it)."""
    return {module_name(path) for path in (SRC / PACKAGE).rglob("*.pyi")
            if not path.with_suffix(".py").exists()}


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from … import` statement names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The stemedb modules `module` imports (anywhere in its source)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # `import stemedb.a.b` names stemedb.a.b; keep the longest prefix that is a module.
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, is_package, node)
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                add(submodule if submodule in known else target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files) | compiled_modules()
    return {module: imports_of(module, path, known) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or not: Tarjan's strongly
    connected components of more than one module (or of one that imports itself), each as
    its sorted members."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = lowest[node] = len(index)
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                lowest[node] = min(lowest[node], lowest[successor])
            elif successor in stack:
                lowest[node] = min(lowest[node], index[successor])
        if lowest[node] == index[node]:
            group = [stack.pop()]
            while group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def describe(graph: dict[str, set[str]], group: list[str]) -> str:
    """The imports inside one group, for the failure message."""
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(group)))}" for m in group)


def test_the_graph_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The walker itself: every spelling of an import is an edge, and a cycle is found."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from stemedb.a import thing\n")
    (package / "a.py").write_text("def f():\n    from stemedb import b\n")
    (package / "b.py").write_text("import stemedb.sub.c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from ..a import f\nfrom . import d\n")
    (package / "sub" / "d.py").write_text("from stemedb import _codec\nimport os\n")
    (package / "e.py").write_text("from stemedb import thing\n")  # a name the package defines
    (package / "_codec.pyi").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph = import_graph()
    assert graph == {"stemedb": {"stemedb.a"}, "stemedb.a": {"stemedb.b"},
                     "stemedb.b": {"stemedb.sub.c"}, "stemedb.sub": set(),
                     "stemedb.sub.c": {"stemedb.a", "stemedb.sub.d"},
                     "stemedb.sub.d": {"stemedb._codec"}, "stemedb.e": {"stemedb"}}
    assert cycles(graph) == [["stemedb.a", "stemedb.b", "stemedb.sub.c"]]
    graph["stemedb.sub.d"].add("stemedb.sub.d")
    assert cycles(graph) == [["stemedb.a", "stemedb.b", "stemedb.sub.c"], ["stemedb.sub.d"]]


def test_no_import_cycles_in_src():
    graph = import_graph()
    assert "stemedb.server.app" in graph and "stemedb.engine.database" in graph
    found = cycles(graph)
    assert found == [], "import cycles:\n" + "\n".join(describe(graph, g) for g in found)
