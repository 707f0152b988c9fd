"""Gated residual, the adaLN-Zero branch merge of every DiT block: ``x + gate * y``.

Four layers (DESIGN.md section 1): the Triton kernels, the launchers ``gated_residual_fwd/_bwd``, the custom ops
``dit_fast::gated_residual`` (+ autograd) and ``dit_fast::gated_residual_bwd``, and the public ``gated_residual``
beside its plain-PyTorch oracle ``gated_residual_ref``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import (
    CompileCase,
    bwd_rows_per_program,
    check_modulation,
    check_row_dim,
    check_same,
    check_tensor,
    last_dim_contiguous,
    register_op,
    row_compile_cases,
    row_config,
    tl,
    triton_dtype,
    triton_kernel,
    use_triton,
)

# Forward, one program per row (token): r = x + gate[b] * y, in fp32, rounded once on store.
# Limits: the row is one masked block of BLOCK_D = next_power_of_2(D) lanes (D <= MAX_FUSED_DIM); gate takes any
# strides (adaLN chunks are (B, D) with stride (6D, 1)); x's and y's last dims are unit stride.


@triton_kernel
def _gated_residual_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, r_ptr,
    T, D,
    stride_xb, stride_xt,
    stride_yb, stride_yt,
    stride_gate_b, stride_gate_d,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * T + t
    b = row // T
    t = row % T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + cols,
                mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b.to(tl.int64) * stride_yb + t.to(tl.int64) * stride_yt + cols,
                mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gate_b + cols * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    tl.store(r_ptr + row.to(tl.int64) * D + cols, (x + gate * y).to(r_ptr.dtype.element_ty), mask=mask)


# Backward, one program per (batch b, block of ROWS tokens), walking its rows (dx = dr needs no kernel):
#   dy = gate[b] * dr  (per row),   dgate[b] = sum_t dr * y  (fp32 partial row per program, summed afterwards:
#   no atomics, deterministic).


@triton_kernel
def _gated_residual_bwd_kernel(
    dr_ptr, gate_ptr, y_ptr, dy_ptr, dgate_part_ptr,
    T, D, ROWS, n_blocks,
    stride_drb, stride_drt,
    stride_yb, stride_yt,
    stride_gate_b, stride_gate_d,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # b * n_blocks + block
    b = pid // n_blocks
    t_start = (pid % n_blocks) * ROWS
    t_end = tl.minimum(t_start + ROWS, T)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gate = tl.load(gate_ptr + b * stride_gate_b + cols * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    row = b.to(tl.int64) * T + t_start  # advanced with the loop, as are the row pointers
    dr_ptrs = dr_ptr + b.to(tl.int64) * stride_drb + t_start.to(tl.int64) * stride_drt + cols
    y_ptrs = y_ptr + b.to(tl.int64) * stride_yb + t_start.to(tl.int64) * stride_yt + cols
    for _ in range(t_start, t_end):
        dr = tl.load(dr_ptrs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        dgate += dr * y
        tl.store(dy_ptr + row * D + cols, (gate * dr).to(dy_ptr.dtype.element_ty), mask=mask)
        row += 1
        dr_ptrs += stride_drt
        y_ptrs += stride_yt
    tl.store(dgate_part_ptr + pid.to(tl.int64) * D + cols, dgate, mask=mask)


def _check_inputs(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    check_tensor("x", x, 3)
    check_tensor("y", y, 3)
    if y.shape != x.shape:
        raise ValueError(f"y shape {tuple(y.shape)} != x shape {tuple(x.shape)}")
    check_same("x", x, [("y", y)])
    check_modulation("gate", gate, x)


def gated_residual_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel (no autograd): x, y (B, T, D), gate (B, D) -> r (B, T, D)."""
    _check_inputs(x, gate, y)
    x = last_dim_contiguous(x)
    y = last_dim_contiguous(y)
    B, T, D = x.shape
    check_row_dim(D)
    r = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    if B * T == 0:
        return r
    block_d, num_warps = row_config(D)
    _gated_residual_fwd_kernel[(B * T,)](
        x, gate, y, r,
        T, D,
        x.stride(0), x.stride(1),
        y.stride(0), y.stride(1),
        gate.stride(0), gate.stride(1),
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return r


def gated_residual_bwd(grad_r: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel (no autograd): grads (dgate (B, D), dy (B, T, D)); dx is ``grad_r`` itself.

    dgate is summed over tokens deterministically (per-block fp32 partials, then one reduction).
    """
    _check_inputs(grad_r, gate, y)
    grad_r = last_dim_contiguous(grad_r)
    y = last_dim_contiguous(y)
    B, T, D = y.shape
    dy = torch.empty((B, T, D), dtype=y.dtype, device=y.device)
    rows = bwd_rows_per_program(B, T)
    n_blocks = -(-T // rows)
    dgate_part = torch.empty((B, n_blocks, D), dtype=torch.float32, device=y.device)
    if B * T > 0:
        block_d, num_warps = row_config(D)
        _gated_residual_bwd_kernel[(B * n_blocks,)](
            grad_r, gate, y, dy, dgate_part,
            T, D, rows, n_blocks,
            grad_r.stride(0), grad_r.stride(1),
            y.stride(0), y.stride(1),
            gate.stride(0), gate.stride(1),
            BLOCK_D=block_d, num_warps=num_warps,
        )
    return dgate_part.sum(dim=1).to(gate.dtype), dy


_fwd_op = register_op("dit_fast::gated_residual", gated_residual_fwd)
_bwd_op = register_op("dit_fast::gated_residual_bwd", gated_residual_bwd)


def _setup_context(ctx, inputs, output) -> None:
    _x, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _backward(ctx, grad_r):
    gate, y = ctx.saved_tensors
    dgate, dy = _bwd_op(grad_r, gate, y)
    return grad_r, dgate, dy


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch oracle: ``x + gate[:, None] * y``; x, y (B, T, D), gate (B, D) -> (B, T, D)."""
    return x + gate.unsqueeze(1) * y


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None] * y`` in one pass, differentiable.

    Args:
        x: (B, T, D) residual stream, fp32/fp16/bf16.
        gate: (B, D), same dtype and device; any strides (e.g. a chunk of ``adaLN_modulation(c)``).
        y: (B, T, D) branch output (attention or MLP).

    Returns:
        (B, T, D), x's dtype. CUDA tensors run the Triton kernels; CPU tensors the reference (or the kernels in the
        Triton interpreter with ``TRITON_INTERPRET=1``).
    """
    _check_inputs(x, gate, y)
    if not use_triton(x):
        return gated_residual_ref(x, gate, y)
    return _fwd_op(x, gate, y)


def compile_cases(dtype: torch.dtype, dims: Sequence[int]) -> list[CompileCase]:
    """The kernel specialisations launched for ``dtype`` tensors of hidden sizes ``dims`` (for ``compile_check``)."""
    t = triton_dtype(dtype)
    fwd = {"x_ptr": t, "gate_ptr": t, "y_ptr": t, "r_ptr": t}
    bwd = {"dr_ptr": t, "gate_ptr": t, "y_ptr": t, "dy_ptr": t, "dgate_part_ptr": "fp32"}
    return row_compile_cases([(_gated_residual_fwd_kernel, fwd, {}), (_gated_residual_bwd_kernel, bwd, {})], dims)
