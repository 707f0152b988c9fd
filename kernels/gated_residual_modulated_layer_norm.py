"""The DiT block boundary in one pass: ``r = x + gate * y`` and ``out = layer_norm(r) * (1 + scale) + shift``.

One read of x and y, one write of r (the residual stream, for the next residual add) and of out (the next branch's
input). Four layers (DESIGN.md section 1): the Triton kernels, the launchers
``gated_residual_modulated_layer_norm_fwd/_bwd``, the custom ops ``dit_fast::gated_residual_modulated_layer_norm``
(+ autograd) and ``dit_fast::gated_residual_modulated_layer_norm_bwd``, and the public
``gated_residual_modulated_layer_norm`` beside its plain-PyTorch oracle ``gated_residual_modulated_layer_norm_ref``.
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
from .gated_residual import gated_residual_ref  # also registers dit_fast::gated_residual_bwd
from .modulated_layer_norm import modulated_layer_norm_ref

# Forward, one program per row (token), math in fp32:
#   r = x + gate[b] * y, rounded to the output dtype and stored; the LayerNorm then reads that rounded r (what the
#   unfused sequence normalises, and what the backward recomputes r-hat from):
#   mean, rstd = row statistics of r (two-pass);  out = (r - mean) * rstd * (1 + scale[b]) + shift[b].
# Limits: one masked block of BLOCK_D = next_power_of_2(D) lanes (D <= MAX_FUSED_DIM); gate/shift/scale take any
# strides; x's and y's last dims are unit stride.


@triton_kernel
def _gated_residual_modulated_layer_norm_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr, r_ptr, out_ptr, mean_ptr, rstd_ptr,
    T, D,
    stride_xb, stride_xt,
    stride_yb, stride_yt,
    stride_gate_b, stride_gate_d,
    stride_shift_b, stride_shift_d,
    stride_scale_b, stride_scale_d,
    eps,
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
    r = (x + gate * y).to(r_ptr.dtype.element_ty)
    tl.store(r_ptr + row.to(tl.int64) * D + cols, r, mask=mask)
    r = r.to(tl.float32)
    mean = tl.sum(r, axis=0) / D
    rc = tl.where(mask, r - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(rc * rc, axis=0) / D + eps)
    shift = tl.load(shift_ptr + b * stride_shift_b + cols * stride_shift_d, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scale_b + cols * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    out = rc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row.to(tl.int64) * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


# Backward, one program per (batch b, block of ROWS tokens), walking its rows; given dr (grad of the output r,
# optional: HAS_DR) and dout, with rhat = (r - mean) * rstd and g = dout * (1 + scale[b]):
#   dr_total = rstd * (g - mean_D(g) - rhat * mean_D(g * rhat)) + dr      (the grad reaching r from both outputs)
#   dx = dr_total,  dy = gate[b] * dr_total                                 (per row)
#   dgate[b] = sum_t dr_total * y,  dshift[b] = sum_t dout,  dscale[b] = sum_t dout * rhat
# The token sums are fp32 partial rows per program, summed afterwards: no atomics, deterministic.


@triton_kernel
def _gated_residual_modulated_layer_norm_bwd_kernel(
    dr_ptr, dout_ptr, r_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dy_ptr, dgate_part_ptr, dshift_part_ptr, dscale_part_ptr,
    T, D, ROWS, n_blocks,
    stride_drb, stride_drt,
    stride_dob, stride_dot,
    stride_yb, stride_yt,
    stride_gate_b, stride_gate_d,
    stride_scale_b, stride_scale_d,
    HAS_DR: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # b * n_blocks + block
    b = pid // n_blocks
    t_start = (pid % n_blocks) * ROWS
    t_end = tl.minimum(t_start + ROWS, T)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gate = tl.load(gate_ptr + b * stride_gate_b + cols * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    scale1 = 1.0 + tl.load(scale_ptr + b * stride_scale_b + cols * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    row = b.to(tl.int64) * T + t_start  # advanced with the loop, as are the row pointers
    dr_ptrs = dr_ptr + b.to(tl.int64) * stride_drb + t_start.to(tl.int64) * stride_drt + cols
    dout_ptrs = dout_ptr + b.to(tl.int64) * stride_dob + t_start.to(tl.int64) * stride_dot + cols
    y_ptrs = y_ptr + b.to(tl.int64) * stride_yb + t_start.to(tl.int64) * stride_yt + cols
    for _ in range(t_start, t_end):
        r = tl.load(r_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptrs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        rhat = tl.where(mask, (r - mean) * rstd, 0.0)
        dshift += dout
        dscale += dout * rhat
        g = dout * scale1
        c_rhat = tl.sum(g * rhat, axis=0) / D
        c_mean = tl.sum(g, axis=0) / D
        d_total = (g - rhat * c_rhat - c_mean) * rstd
        if HAS_DR:
            d_total += tl.load(dr_ptrs, mask=mask, other=0.0).to(tl.float32)
        dgate += d_total * y
        tl.store(dx_ptr + row * D + cols, d_total.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + row * D + cols, (gate * d_total).to(dy_ptr.dtype.element_ty), mask=mask)
        row += 1
        dr_ptrs += stride_drt
        dout_ptrs += stride_dot
        y_ptrs += stride_yt
    part = pid.to(tl.int64) * D + cols
    tl.store(dgate_part_ptr + part, dgate, mask=mask)
    tl.store(dshift_part_ptr + part, dshift, mask=mask)
    tl.store(dscale_part_ptr + part, dscale, mask=mask)


def _check_inputs(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                  scale: torch.Tensor) -> None:
    check_tensor("x", x, 3)
    check_tensor("y", y, 3)
    if y.shape != x.shape:
        raise ValueError(f"y shape {tuple(y.shape)} != x shape {tuple(x.shape)}")
    check_same("x", x, [("y", y)])
    check_modulation("gate", gate, x)
    check_modulation("shift", shift, x)
    check_modulation("scale", scale, x)


def gated_residual_modulated_layer_norm_fwd(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no autograd): -> (r, out (B, T, D), mean, rstd (B, T) fp32 statistics of r).

    x, y (B, T, D); gate, shift, scale (B, D).
    """
    _check_inputs(x, gate, y, shift, scale)
    x = last_dim_contiguous(x)
    y = last_dim_contiguous(y)
    B, T, D = x.shape
    check_row_dim(D)
    r = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    out = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    mean = torch.empty((B, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, T), dtype=torch.float32, device=x.device)
    if B * T == 0:
        return r, out, mean, rstd
    block_d, num_warps = row_config(D)
    _gated_residual_modulated_layer_norm_fwd_kernel[(B * T,)](
        x, gate, y, shift, scale, r, out, mean, rstd,
        T, D,
        x.stride(0), x.stride(1),
        y.stride(0), y.stride(1),
        gate.stride(0), gate.stride(1),
        shift.stride(0), shift.stride(1),
        scale.stride(0), scale.stride(1),
        eps,
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return r, out, mean, rstd


def gated_residual_modulated_layer_norm_bwd(
    grad_r: torch.Tensor | None, grad_out: torch.Tensor, r: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
    scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel (no autograd): grads (dx, dgate, dy, dshift, dscale) given those of r and out.

    ``grad_r`` (or None for zero), ``grad_out``, ``r``, ``y``: (B, T, D); ``gate``/``scale`` (B, D); ``mean``/``rstd``
    the fp32 (B, T) statistics of r. Token sums (dgate, dshift, dscale) are deterministic (fp32 partials, reduced).
    """
    check_tensor("grad_out", grad_out, 3)
    if grad_out.shape != r.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != r shape {tuple(r.shape)}")
    if grad_r is not None and grad_r.shape != r.shape:
        raise ValueError(f"grad_r shape {tuple(grad_r.shape)} != r shape {tuple(r.shape)}")
    grad_out = last_dim_contiguous(grad_out)
    y = last_dim_contiguous(y)
    r = r.contiguous()
    B, T, D = r.shape
    dx = torch.empty((B, T, D), dtype=r.dtype, device=r.device)
    dy = torch.empty((B, T, D), dtype=r.dtype, device=r.device)
    rows = bwd_rows_per_program(B, T)
    n_blocks = -(-T // rows)
    parts = [torch.empty((B, n_blocks, D), dtype=torch.float32, device=r.device) for _ in range(3)]
    if B * T > 0:
        has_dr = grad_r is not None
        dr = last_dim_contiguous(grad_r) if has_dr else grad_out  # any valid pointer when HAS_DR is off
        block_d, num_warps = row_config(D)
        _gated_residual_modulated_layer_norm_bwd_kernel[(B * n_blocks,)](
            dr, grad_out, r, y, gate, scale, mean, rstd,
            dx, dy, *parts,
            T, D, rows, n_blocks,
            dr.stride(0), dr.stride(1),
            grad_out.stride(0), grad_out.stride(1),
            y.stride(0), y.stride(1),
            gate.stride(0), gate.stride(1),
            scale.stride(0), scale.stride(1),
            HAS_DR=has_dr, BLOCK_D=block_d, num_warps=num_warps,
        )
    dgate, dshift, dscale = (p.sum(dim=1).to(gate.dtype) for p in parts)
    return dx, dgate, dy, dshift, dscale


_fwd_op = register_op("dit_fast::gated_residual_modulated_layer_norm", gated_residual_modulated_layer_norm_fwd)
_bwd_op = register_op("dit_fast::gated_residual_modulated_layer_norm_bwd", gated_residual_modulated_layer_norm_bwd)


def _setup_context(ctx, inputs, output) -> None:
    _x, gate, y, _shift, scale, _eps = inputs
    r, _out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # a None grad of r or out skips its work instead of reading zeros
    ctx.save_for_backward(r, y, gate, scale, mean, rstd)


def _backward(ctx, grad_r, grad_out, _grad_mean, _grad_rstd):
    r, y, gate, scale, mean, rstd = ctx.saved_tensors
    if grad_out is None:  # only r is used: the gated residual's backward, no LayerNorm terms
        if grad_r is None:
            return None, None, None, None, None, None
        dgate, dy = torch.ops.dit_fast.gated_residual_bwd(grad_r, gate, y)
        return grad_r, dgate, dy, torch.zeros_like(gate), torch.zeros_like(scale), None
    dx, dgate, dy, dshift, dscale = _bwd_op(grad_r, grad_out, r, y, gate, scale, mean, rstd)
    return dx, dgate, dy, dshift, dscale, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def gated_residual_modulated_layer_norm_ref(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch oracle: ``r = x + gate[:, None] * y``, ``(r, modulated_layer_norm_ref(r, shift, scale, eps))``."""
    r = gated_residual_ref(x, gate, y)
    return r, modulated_layer_norm_ref(r, shift, scale, eps)


def gated_residual_modulated_layer_norm(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block boundary in one pass: ``r = x + gate[:, None] * y`` and the next branch's modulated LayerNorm of r.

    Args:
        x: (B, T, D) residual stream, fp32/fp16/bf16.
        gate: (B, D) gate of the branch just computed (e.g. ``gate_msa``); any strides.
        y: (B, T, D) that branch's output.
        shift, scale: (B, D) modulation of the next branch (e.g. ``shift_mlp``, ``scale_mlp``); any strides.
        eps: LayerNorm epsilon (DiT uses 1e-6).

    Returns:
        ``(r, out)``, both (B, T, D) in x's dtype, with ``out = layer_norm(r) * (1 + scale[:, None]) +
        shift[:, None]``; differentiable through both. CUDA tensors run the Triton kernels; CPU tensors the
        reference (or the kernels in the Triton interpreter with ``TRITON_INTERPRET=1``).
    """
    _check_inputs(x, gate, y, shift, scale)
    if not use_triton(x):
        return gated_residual_modulated_layer_norm_ref(x, gate, y, shift, scale, eps)
    r, out, _mean, _rstd = _fwd_op(x, gate, y, shift, scale, float(eps))
    return r, out


def compile_cases(dtype: torch.dtype, dims: Sequence[int]) -> list[CompileCase]:
    """The kernel specialisations launched for ``dtype`` tensors of hidden sizes ``dims`` (for ``compile_check``)."""
    t = triton_dtype(dtype)
    fwd = {"x_ptr": t, "gate_ptr": t, "y_ptr": t, "shift_ptr": t, "scale_ptr": t, "r_ptr": t, "out_ptr": t,
           "mean_ptr": "fp32", "rstd_ptr": "fp32"}
    bwd = {"dr_ptr": t, "dout_ptr": t, "r_ptr": t, "y_ptr": t, "gate_ptr": t, "scale_ptr": t, "mean_ptr": "fp32",
           "rstd_ptr": "fp32", "dx_ptr": t, "dy_ptr": t, "dgate_part_ptr": "fp32", "dshift_part_ptr": "fp32",
           "dscale_part_ptr": "fp32"}
    return row_compile_cases([
        (_gated_residual_modulated_layer_norm_fwd_kernel, fwd, {}),
        (_gated_residual_modulated_layer_norm_bwd_kernel, bwd, {"HAS_DR": True}),
        (_gated_residual_modulated_layer_norm_bwd_kernel, bwd, {"HAS_DR": False}),
    ], dims)
