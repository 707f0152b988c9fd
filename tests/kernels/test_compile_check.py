"""compile_check: every kernel builds for sm_80 and sm_90 without a GPU (a representative subset here)."""

from __future__ import annotations

import os
import subprocess
import sys

from dit_fast.kernels import compile_check


def test_cli_builds_bf16_kernels_for_sm80_and_sm90():
    """The CLI, as users run it (TRITON_INTERPRET unset), on bf16 at DiT-XL's hidden size: all 5 ops, both archs.

    The full matrix (3 dtypes x 4 hidden sizes x every patch shape, 234 builds) takes about a minute:
    ``python -m dit_fast.kernels.compile_check``.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "dit_fast.kernels.compile_check", "--dtypes", "bf16", "--dims", "1152"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    built = [line for line in lines if line.startswith("OK ")]
    kernels = {line.split()[1] for line in built}
    assert kernels == {
        "_modulated_layer_norm_fwd_kernel", "_modulated_layer_norm_bwd_kernel",
        "_gated_residual_fwd_kernel", "_gated_residual_bwd_kernel",
        "_gated_residual_modulated_layer_norm_fwd_kernel", "_gated_residual_modulated_layer_norm_bwd_kernel",
        "_patchify_fwd_kernel", "_patchify_bwd_kernel",
    }
    assert {line.split()[3] for line in built} == {"sm_80", "sm_90"}
    assert not any(line.startswith("FAIL") for line in lines)
    assert lines[-1] == f"{len(built)}/{len(built)} kernel builds succeeded" + lines[-1].split("succeeded")[1]


def test_in_process_with_the_interpreter_variable_set(capsys):
    """Builds compiled kernels even though this process runs the interpreter (TRITON_INTERPRET=1, conftest)."""
    args = ["--ops", "modulated_layer_norm", "--dtypes", "fp16", "--archs", "90", "--dims", "384"]
    assert compile_check.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 2 and "regs=" in out
