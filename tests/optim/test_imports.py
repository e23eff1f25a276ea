"""optim/ stands alone and has no import circle, function-level imports included (read from the AST)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

OPTIM = Path(__file__).resolve().parents[2] / "optim"
ALLOWED = {"torch", "triton"} | set(sys.stdlib_module_names)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere (top level or inside functions), absolute names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.add(node.module or "")
            else:  # from . import x / from .x import y, inside the optim package
                base = "optim" + (f".{node.module}" if node.module else "")
                out |= {f"{base}.{a.name}" if not node.module else base for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {f"optim.{p.stem}" if p.stem != "__init__" else "optim": p for p in OPTIM.glob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_optim_imports_only_torch_and_triton():
    for path in OPTIM.glob("*.py"):
        outside = {m for m in _imports(path) if m.split(".")[0] not in ALLOWED | {"optim"}}
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_no_import_circle_inside_optim():
    graph = {k: v for k, v in _graph().items() if k != "optim"}  # the package re-exports; it is no module's dependency
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            assert nxt not in path, "import circle: " + " -> ".join(path[path.index(nxt):] + [nxt])
            if nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])


def test_qk_clip_does_not_reach_into_the_distributed_core():
    assert "optim.distributed" not in _graph()["optim.qk_clip"]
