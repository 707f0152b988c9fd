"""Compile every fused kernel for sm_80 and sm_90, no GPU needed: ``python -m dit_fast.kernels.compile_check``.

Each case is a launch the launchers really issue: the op's launchers are called on (uninitialised) CPU tensors laid
out as DiT passes them (DiT-XL/2 shapes at 256 px, batch 32, adaLN chunks as strided views) with the kernels'
launches captured instead of run. Triton's own JIT binder then specialises each launch for the target exactly as a
launch on that GPU would (pointer dtypes, 16-byte divisibility of pointers and integers, integers equal to 1 folded
into constants, the launcher's constexprs and ``num_warps``), and ``triton.compile`` builds it down to a cubin. One
line per build gives the warps per program (the compiled kernel's metadata) and the resources ptxas assigned
(registers per thread, spills to local memory, stack, shared memory), read from the cubin with the ``cuobjdump``
that ships with Triton. Exits 1 if any build fails.

Dtypes: ``fp32``, ``fp16``, ``bf16`` (everything in one dtype) and ``fp32/bf16``, ``fp32/fp16`` (autocast: an fp32
residual stream with the branch, gate, shift and scale in the lower precision; row ops only, the patch ops never mix).
The specialisation goes through the JIT's own (private) helpers, ``triton.runtime.jit.create_function_from_signature``
and ``JITFunction._pack_args``, as recent Triton 3.x releases have them (checked with Triton 3.8); if a release
renames them, every build fails loudly instead of compiling a different specialisation.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._common import Launch, language_flavour, require_triton

ROW_OPS = ("modulated_layer_norm", "gated_residual", "gated_residual_modulated_layer_norm")
PATCH_OPS = ("patchify", "unpatchify")
# Op name -> its module (imported by name: the package re-exports the op functions under the same names).
OPS = {name: importlib.import_module(f"{__package__}.{name}") for name in ROW_OPS + PATCH_OPS}
# Dtype spec -> (residual stream dtype, modulation/branch dtype).
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32/bf16": (torch.float32, torch.bfloat16),
    "fp32/fp16": (torch.float32, torch.float16),
}
ARCHS = (80, 90)
DIMS = (384, 768, 1024, 1152)


def cases(op: str, dtype: str, dims: Sequence[int]) -> list[tuple[str, Launch]]:
    """The captured launches of ``op`` for a dtype spec and hidden sizes (none for a patch op with a mixed spec)."""
    x_dtype, mod_dtype = DTYPES[dtype]
    if op in ROW_OPS:
        return OPS[op].compile_cases(x_dtype, mod_dtype, dims)
    return OPS[op].compile_cases(x_dtype) if x_dtype == mod_dtype else []


def specialise(launch: Launch, arch: int) -> tuple[Any, dict[str, Any]]:
    """``(ASTSource, options)`` of ``launch`` as the JIT builds it for ``sm_<arch>`` (its binder and arg packing)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = launch.kernel.jit
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = jit._pack_args(backend, launch.meta, bound_args, specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options.__dict__


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


def build(launch: Launch, arch: int) -> dict[str, int]:
    """Compile one launch for ``sm_<arch>`` (raises on a compile error); returns what the build occupies per program:
    ``num_warps`` (the compiled kernel's metadata), ``shared`` bytes, and where cuobjdump is available ``regs`` per
    thread, ``local`` (spill) and ``stack`` bytes."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, options = specialise(launch, arch)
    with language_flavour(interpreted=False):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    metadata = compiled.metadata
    return {"num_warps": metadata.num_warps, "shared": metadata.shared, **resource_usage(compiled.asm["cubin"])}


def summary(usage: dict[str, int]) -> str:
    """One build's resources as compile_check prints them, e.g. ``warps=8 regs= 72 spill(local)=0 B ...``."""
    head = f"warps={usage['num_warps']} "
    if "regs" not in usage:
        return head + f"shared={usage['shared']} B (cuobjdump unavailable: registers/spills not read)"
    return (head + f"regs={usage['regs']:3d} spill(local)={usage['local']} B stack={usage['stack']} B "
            f"shared={usage['shared']} B")


def compile_launch(launch: Launch, arch: int) -> str:
    """Compile one launch for ``sm_<arch>``; returns the resource summary (raises on a compile error)."""
    return summary(build(launch, arch))


def describe(launch: Launch) -> str:
    """The launch's constexpr keywords, e.g. ``HAS_NORM=True BLOCK_M=2 ...`` (the warps come with the build)."""
    return " ".join(f"{k}={v}" for k, v in launch.meta.items() if k != "num_warps")


def run(ops: Sequence[str], dtypes: Sequence[str], archs: Sequence[int], dims: Sequence[int]) -> int:
    """Compile the selected cases, print a line each and a summary; returns the number of failures."""
    require_triton()
    failures = 0
    total = 0
    start = time.perf_counter()
    for op in ops:
        for dtype in dtypes:
            for label, launch in cases(op, dtype, dims):
                for arch in archs:
                    total += 1
                    head = f"{launch.kernel.__name__:<16} {dtype:<9} sm_{arch} {label:<48} {describe(launch)}"
                    try:
                        print(f"OK   {head}: {compile_launch(launch, arch)}", flush=True)
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
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="x dtype, or residual-stream/modulation dtypes")
    parser.add_argument("--archs", nargs="+", type=int, choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--dims", nargs="+", type=int, default=list(DIMS), help="hidden sizes (row kernels)")
    args = parser.parse_args(argv)
    return 1 if run(args.ops, args.dtypes, args.archs, args.dims) else 0


if __name__ == "__main__":
    sys.exit(main())
