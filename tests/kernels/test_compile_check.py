"""compile_check: every kernel builds for sm_80 and sm_90 without a GPU, at the launchers' real specialisation (a
representative subset here; the full matrix is ``python -m dit_fast.kernels.compile_check``, ~390 builds)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from dit_fast.kernels import compile_check


def test_cli_builds_bf16_and_mixed_kernels_at_dit_xl_width():
    """The CLI, as users run it (TRITON_INTERPRET unset): bf16 and fp32/bf16 (autocast) at D=1152 for sm_90, every op
    (the row kernel in each flag combination, the patch kernel in both directions), registers reported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "dit_fast.kernels.compile_check", "--dtypes", "bf16", "fp32/bf16", "--dims", "1152",
           "--archs", "90"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    built = [line for line in lines if line.startswith("OK ")]
    assert {line.split()[1] for line in built} == {"_row_fwd_kernel", "_row_bwd_kernel", "_patch_kernel"}
    assert {line.split()[2] for line in built} == {"bf16", "fp32/bf16"}
    # 3 row ops x (fwd + bwd, the fused op two bwds) x 2 dtype specs, + the patch kernels (bf16 only): p in 2, 4, 8,
    # patchify fwd/bwd and unpatchify (4 or 8 channels) fwd/bwd.
    assert len(built) == 7 * 2 + 3 * 6
    fused_fwd = [line for line in built if "gated_residual_modulated_layer_norm fwd D=1152" in line]
    assert len(fused_fwd) == 2 and all("BLOCK_D=1024 BLOCK_TAIL=128" in line and "regs=" in line for line in fused_fwd)
    assert not any(line.startswith("FAIL") for line in lines)
    assert lines[-1] == f"{len(built)}/{len(built)} kernel builds succeeded" + lines[-1].split("succeeded")[1]


def test_specialisation_is_the_jits():
    """The builds see what a launch on the GPU would: pointer dtypes per argument (fp32 stream, bf16 modulation),
    16-divisible integers (D = 1152) and unit strides folded into constants, the launcher's constexprs."""
    (_, fwd), _ = compile_check.cases("gated_residual_modulated_layer_norm", "fp32/bf16", [1152])[:2]
    src, options = compile_check.specialise(fwd, 90)
    names = list(src.signature)
    assert src.signature["x_ptr"] == "*fp32" and src.signature["shift_ptr"] == "*bf16"
    assert src.signature["out_ptr"] == "*bf16" and src.signature["r_ptr"] == "*fp32"
    assert src.signature["stride_shift_d"] == "constexpr" and src.constants[(names.index("stride_shift_d"),)] == 1
    assert ["tt.divisibility", 16] in src.attrs[(names.index("D"),)]
    assert src.constants[(names.index("BLOCK_TAIL"),)] == 128 and options["num_warps"] == fwd.meta["num_warps"]
    assert fwd.args[0].dtype == torch.float32


def test_in_process_with_the_interpreter_variable_set(capsys):
    """Builds compiled kernels even though this process runs the interpreter (TRITON_INTERPRET=1, conftest)."""
    args = ["--ops", "gated_residual", "--dtypes", "fp16", "--archs", "80", "--dims", "384"]
    assert compile_check.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 2 and "regs=" in out


def test_dit_xl_backwards_are_off_the_occupancy_cliff():
    """Every D = 1152 backward specialisation (3 row ops, 5 dtype specs, the fused op's two flavours: 20 launches)
    runs 8 warps or <= 96 registers per thread; one is built to read both from the compiled kernel (4 warps at up to
    128 registers before)."""
    backwards = [(label, launch) for op in compile_check.ROW_OPS for dtype in compile_check.DTYPES
                 for label, launch in compile_check.cases(op, dtype, [1152]) if " bwd" in label]
    assert len(backwards) == 20
    assert all(launch.meta["num_warps"] == 8 for _, launch in backwards)
    fused = next(launch for label, launch in compile_check.cases("gated_residual_modulated_layer_norm", "fp32/bf16",
                                                                 [1152]) if " bwd" in label)
    usage = compile_check.build(fused, 90)
    assert usage["num_warps"] == 8 or usage.get("regs", 0) <= 96
    assert usage.get("local", 0) == 0  # no spills
