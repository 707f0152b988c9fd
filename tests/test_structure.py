"""The package's shape: no import cycle in dit_fast, imports at module level (function-level ones only defer heavy
optional packages), one atomic-write helper (``os.replace`` in one source file); folders that show the layers (at
most 10 top-level entries), modules and functions of readable size, argparse and exits only in the command layer,
a diffusion package that knows only a callable model, short module docstrings, and a README that is a guide."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "dit_fast"
# What a function may import: heavy or optional third-party packages, imported only when a feature needs them.
DEFERRED = {"diffusers", "matplotlib", "sklearn", "scipy", "xformers", "flash_attn", "triton", "torchao"}


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


# ---------------------------------------------------------------------------------------------------- the layout

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_DOCSTRING_LINES = 30
MAX_TOP_LEVEL_ENTRIES = 10
# The port of the official gaussian_diffusion.py keeps the official file's shape, so a diff against it stays readable.
LONG_MODULES = {"dit_fast.diffusion.gaussian_diffusion"}
# Reading official train.py checkpoints allows argparse.Namespace (their pickled "args") through torch.load.
ARGPARSE_READERS = {"dit_fast.checkpoints.read"}
# The kernel layer's own developer tool, `python -m dit_fast.kernels.compile_check` (kernels/ imports nothing of
# dit_fast, so it parses its flags and exits itself).
KERNEL_TOOLS = {"dit_fast.kernels.compile_check"}


def _in_command_layer(module: str) -> bool:
    return module == "dit_fast.cli" or module == "dit_fast.commands" or module.startswith("dit_fast.commands.")


def _trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), filename=str(path)) for name, path in _modules().items()}


def test_top_level_entries():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name not in {"__init__.py", "__pycache__", "kernels"})
    assert len(entries) <= MAX_TOP_LEVEL_ENTRIES, entries


def test_module_length():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES and name not in LONG_MODULES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_function_length_outside_kernels():
    long = []
    for name, tree in _trees().items():
        if name.startswith("dit_fast.kernels"):
            continue
        long += [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_module_docstrings_are_summaries():
    long = {name: n for name, tree in _trees().items()
            if (n := len((ast.get_docstring(tree, clean=False) or "").splitlines())) > MAX_DOCSTRING_LINES}
    assert not long, f"module docstrings over {MAX_DOCSTRING_LINES} lines (move the detail to docs/): {long}"


def test_argparse_only_in_the_command_layer():
    users = sorted(name for name, tree in _trees().items()
                   if any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                          or isinstance(n, ast.ImportFrom) and n.module == "argparse" for n in ast.walk(tree))
                   and not _in_command_layer(name) and name not in KERNEL_TOOLS)
    assert users == sorted(ARGPARSE_READERS), users


def test_only_the_cli_exits():
    """Library code and commands raise exceptions; only cli.py turns them into exit statuses."""
    offenders = []
    for name, tree in _trees().items():
        if name == "dit_fast.cli" or name in KERNEL_TOOLS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                offenders.append(f"{name}:{node.lineno} SystemExit")
            elif isinstance(node, ast.Attribute) and node.attr == "exit" and isinstance(node.value, ast.Name) \
                    and node.value.id in {"sys", "os"}:
                offenders.append(f"{name}:{node.lineno} {node.value.id}.exit")
    assert not offenders, offenders


def test_diffusion_knows_only_a_callable_model():
    graph = _import_graph()
    outside = {f"{m} -> {d}" for m, deps in graph.items() if m.startswith("dit_fast.diffusion")
               for d in deps if not d.startswith("dit_fast.diffusion")}
    assert not outside, sorted(outside)


def test_readme_is_a_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
