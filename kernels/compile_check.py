"""Compile every fused kernel for sm_80 and sm_90, no GPU needed: ``python -m dit_fast.kernels.compile_check``.

For each op, dtype (fp32/fp16/bf16) and launch configuration its launcher picks for DiT's hidden sizes (384, 768,
1024, 1152) or patch shapes, builds the kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`` down to a cubin, and prints one line with the resources ptxas assigned (registers, stack, local memory i.e.
spills, shared memory), read from the cubin with the ``cuobjdump`` that ships with Triton. Exits 1 if any build fails.

The kernels are compiled with their generic signature (32-bit integer arguments, no value specialisation), a superset
of what the JIT builds at launch. Works with Triton >= 3.3 (name-keyed ``ASTSource`` signatures).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ._common import CompileCase, language_flavour, require_triton

# Op name -> its module (imported by name: the package re-exports the op functions under the same names).
OPS = {name: importlib.import_module(f"{__package__}.{name}") for name in (
    "modulated_layer_norm", "gated_residual", "gated_residual_modulated_layer_norm", "patchify", "unpatchify")}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARCHS = (80, 90)
DIMS = (384, 768, 1024, 1152)


def signature(case: CompileCase) -> dict[str, str]:
    """``ASTSource`` signature of a case: ``*dtype`` for ``*_ptr`` args, fp32 ``eps``, i32 otherwise, constexprs."""
    sig = {}
    for name, param in inspect.signature(case.kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + case.ptr_dtypes[name]
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _cuobjdump() -> Path | None:
    import triton.backends.nvidia

    path = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    return path if path.is_file() else None


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, local and shared bytes of a one-kernel cubin (``cuobjdump -res-usage``); {} if unavailable."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if match is None:
        return {}
    return dict(zip(("regs", "stack", "shared", "local"), map(int, match.groups()), strict=True))


def compile_case(case: CompileCase, arch: int) -> str:
    """Compile one case for ``sm_<arch>``; returns the resource summary (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(case.kernel.jit, signature=signature(case), constexprs=case.constexprs)
    with language_flavour(interpreted=False):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps})
    usage = resource_usage(compiled.asm["cubin"])
    shared = getattr(compiled.metadata, "shared", None)
    if not usage:
        return f"shared={shared} B (cuobjdump unavailable: registers/spills not read)"
    return (f"regs={usage['regs']:3d} spill(local)={usage['local']} B stack={usage['stack']} B "
            f"shared={shared} B")


def run(ops: Sequence[str], dtypes: Sequence[str], archs: Sequence[int], dims: Sequence[int]) -> int:
    """Compile the selected cases, print a line each and a summary; returns the number of failures."""
    require_triton()
    failures = 0
    total = 0
    start = time.perf_counter()
    for op in ops:
        for dtype in dtypes:
            for case in OPS[op].compile_cases(DTYPES[dtype], dims):
                consts = " ".join(f"{k}={v}" for k, v in case.constexprs.items())
                for arch in archs:
                    total += 1
                    head = (f"{case.kernel.__name__:<52} {dtype:<4} sm_{arch} {case.label:<16} "
                            f"warps={case.num_warps} {consts}")
                    try:
                        print(f"OK   {head}: {compile_case(case, arch)}", flush=True)
                    except Exception as e:  # report every failure, then exit non-zero
                        failures += 1
                        print(f"FAIL {head}: {type(e).__name__}: {e}", flush=True)
    print(f"{total - failures}/{total} kernel builds succeeded in {time.perf_counter() - start:.1f} s")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 if any build failed)."""
    parser = argparse.ArgumentParser(prog="python -m dit_fast.kernels.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--archs", nargs="+", type=int, choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--dims", nargs="+", type=int, default=list(DIMS), help="hidden sizes (row kernels)")
    args = parser.parse_args(argv)
    return 1 if run(args.ops, args.dtypes, args.archs, args.dims) else 0


if __name__ == "__main__":
    sys.exit(main())
