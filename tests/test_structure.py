"""The package's shape: no import cycle in dit_fast, imports at module level (function-level ones only defer heavy
optional packages), one atomic-write helper (``os.replace`` in one source file), and train.py kept small."""

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
    assert {"dit_fast.train", "dit_fast.sample", "dit_fast.model", "dit_fast.kernels.registry"} <= set(graph)
    assert "dit_fast.distributed" in graph["dit_fast.train"] and "dit_fast.distributed" in graph["dit_fast.sample"]
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
    probe = "import sys, dit_fast.env; print('dit_fast.model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"


def test_os_replace_in_one_source_file():
    sources = [p for top in ("dit_fast", "kernels", "benchmarks") for p in (ROOT / top).rglob("*.py")]
    users = sorted({str(p.resolve().relative_to(ROOT)) for p in sources if "os.replace" in p.read_text()})
    assert users == ["dit_fast/files.py"], users


def test_train_py_stays_small():
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= 450


def test_moved_names_still_import_from_their_old_modules():
    from dit_fast import kernels as K
    from dit_fast import model as M
    from dit_fast import train, train_state
    from dit_fast.kernels import registry

    for name in ("KERNELS", "KERNELS_ENV_VAR", "KernelOps", "require_kernels", "resolve_kernels"):
        assert getattr(M, name) is getattr(registry, name)
    assert K.KERNELS is registry.KERNELS and K.resolve_kernels is registry.resolve_kernels
    for name in ("atomic_save", "list_checkpoints", "load_train_checkpoint", "resolve_resume", "rng_state",
                 "set_rng_state", "state_dicts", "load_state_dicts", "new_experiment_dir", "seed_everything",
                 "setup_distributed", "all_reduce_mean", "broadcast_object", "Dist", "peak_flops", "DIGITS_RECIPE",
                 "OFFICIAL_RECIPE", "DIGITS_MODEL", "CHECKPOINT_FORMAT", "build_model", "update_ema"):
        assert hasattr(train, name), name
    assert train.list_checkpoints is train_state.list_checkpoints
