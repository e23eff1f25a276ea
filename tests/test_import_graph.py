"""No import circle under kimi_train/ or optim/, function-level imports included.

A function-level import hides a circle from Python (it runs later), not from a reader: the
two modules still need each other. The graph here has one node per module (a package is its
``__init__``) and one edge per ``import``/``from ... import`` anywhere in a module's AST,
inside functions too, to the module it names (``from p import name`` -> ``p.name`` when that
is a module, else ``p``). The parent packages Python runs on the way to a submodule are not
edges: they are where a package exposes its parts, not a dependency of the importer.

    python tests/test_import_graph.py          # prints the graph, one module and its imports a line
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kimi_train", "optim")


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` is, or lies in (``a.b.func`` -> ``a.b``); None outside our packages."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imported_names(module: str, path: Path) -> list[str]:
    """Every name ``module`` (at ``path``) imports anywhere in its AST, made absolute
    (``from .x import y`` in package ``p`` -> ``p.x.y``; ``import a.b`` -> ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of kimi_train/optim it imports (anywhere in its AST)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name in imported_names(module, path):
            target = _resolve(name, modules)
            if target is not None and target != module:
                graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _in(package: str, component: list[str]) -> bool:
    return all(m == package or m.startswith(package + ".") for m in component)


def test_the_graph_sees_function_level_imports(tmp_path):
    """The walker itself: a circle closed by an import inside a function is found."""
    pkg = tmp_path / "kimi_train"
    pkg.mkdir()
    (tmp_path / "optim").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from kimi_train.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    graph = import_graph(tmp_path)
    assert graph["kimi_train.a"] == {"kimi_train.b"} and graph["kimi_train.b"] == {"kimi_train.a"}
    assert cycles(graph) == [["kimi_train.a", "kimi_train.b"]]


def test_no_import_circle_in_kimi_train():
    found = [c for c in cycles(import_graph()) if any(m.startswith("kimi_train") for m in c)]
    assert not found, f"import circles: {found}"


def test_no_import_circle_in_optim():
    found = [c for c in cycles(import_graph()) if _in("optim", c)]
    assert not found, f"import circles: {found}"


def test_optim_stands_alone_on_torch_and_triton():
    """optim/ is a library of its own: beyond itself, only torch, triton and the standard library."""
    allowed = {"torch", "triton", "optim", *sys.stdlib_module_names}
    outside = {m: sorted({n for n in imported_names(m, p) if n.split(".")[0] not in allowed})
               for m, p in _modules().items() if m.split(".")[0] == "optim"}
    assert not any(outside.values()), {m: n for m, n in outside.items() if n}


def test_qk_clip_does_not_reach_into_the_distributed_core():
    assert "optim.distributed" not in import_graph()["optim.qk_clip"]


def test_optim_never_imports_kimi_train():
    graph = import_graph()
    leaks = {m: sorted(t for t in ts if t.startswith("kimi_train")) for m, ts in graph.items() if m.startswith("optim")}
    assert not any(leaks.values()), {m: t for m, t in leaks.items() if t}


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    g = import_graph(root)
    for m in sorted(g):
        print(m, "->", ", ".join(sorted(g[m])) or "-")
    print("cycles:", cycles(g) or "none")
