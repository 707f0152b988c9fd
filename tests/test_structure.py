"""The package's shape: no import cycle in dit_fast, imports at module level (function-level ones only defer heavy
optional packages), one atomic-write helper (``os.replace`` in one source file)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "dit_fast"
# What a function may import: heavy or optional third-party packages, imported only when a feature needs them.
DEFERRED = {"diffusers", "matplotlib", "sklearn", "scipy", "xformers", "flash_attn", "triton"}


def _modules() -> dict[str, Path]:
    """Every module of dit_fast (dit_fast/kernels is the kernels/ folder, through its symlink) -> its file."""
    out = {}
    files = [Path(d, f) for d, _, names in os.walk(PACKAGE, followlinks=True) for f in names if f.endswith(".py")]
    for path in sorted(files):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("dit_fast", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("dit_fast", *parts))
        out[name] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The dit_fast modules an import statement in ``module`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*parent, *([base] if base else [])])
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the dit_fast modules its module-level statements import (imports inside functions excluded)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        stack: list[ast.AST] = list(tree.body)
        while stack:  # module level, including if/try blocks, but not function or class bodies
            node = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(m for m in _imported(node, name, path.name == "__init__.py", known) if m in known)
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                stack.extend(ast.iter_child_nodes(node))
        graph[name] = edges - {name}
    return graph


def test_import_graph_is_acyclic():
    graph = _import_graph()
    assert {"dit_fast.training.trainer", "dit_fast.commands.sample", "dit_fast.models.dit",
            "dit_fast.kernels.registry"} <= set(graph)
    assert "dit_fast.utils.distributed" in graph["dit_fast.commands.sample"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_function_level_imports_only_defer_optional_packages():
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    roots = [a.name.split(".")[0] for a in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    roots = ["." if inner.level else (inner.module or "").split(".")[0]]
                else:
                    continue
                offenders += [f"{name}:{inner.lineno} imports {r}" for r in roots if r not in DEFERRED]
    assert not offenders, "imports inside functions that defer nothing heavy:\n" + "\n".join(sorted(set(offenders)))


def test_env_reports_without_importing_the_model():
    probe = "import sys, dit_fast.commands.env; print('dit_fast.models.dit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"


def test_os_replace_in_one_source_file():
    sources = [p for top in ("dit_fast", "kernels", "benchmarks") for p in (ROOT / top).rglob("*.py")]
    users = sorted({str(p.resolve().relative_to(ROOT)) for p in sources if "os.replace" in p.read_text()})
    assert users == ["dit_fast/utils/files.py"], users
