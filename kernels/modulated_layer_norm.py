"""Modulated LayerNorm, the adaLN input of every DiT block: ``layer_norm(x) * (1 + scale) + shift``.

Four layers (DESIGN.md section 1): the Triton kernels, the launchers ``modulated_layer_norm_fwd/_bwd``, the custom ops
``dit_fast::modulated_layer_norm`` (+ autograd) and ``dit_fast::modulated_layer_norm_bwd``, and the public
``modulated_layer_norm`` beside its plain-PyTorch oracle ``modulated_layer_norm_ref``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._common import (
    CompileCase,
    bwd_rows_per_program,
    check_modulation,
    check_row_dim,
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

# Forward, one program per row (token) of x, D = hidden size, all math in fp32:
#   mean = sum(x) / D,  var = sum((x - mean)^2) / D (two-pass, the row stays in registers),  rstd = 1 / sqrt(var + eps)
#   out  = (x - mean) * rstd * (1 + scale[b]) + shift[b];  mean and rstd (fp32, (B, T)) are saved for the backward.
# Limits: the row is one masked block of BLOCK_D = next_power_of_2(D) lanes (D <= MAX_FUSED_DIM); shift/scale take
# any strides (the (B, D) chunks of adaLN_modulation(c).chunk(6, dim=1) have stride (6D, 1)); x's last dim is unit
# stride; row offsets are 64-bit.


@triton_kernel
def _modulated_layer_norm_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr,
    T, D,
    stride_xb, stride_xt,
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
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    shift = tl.load(shift_ptr + b * stride_shift_b + cols * stride_shift_d, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scale_b + cols * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    out = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row.to(tl.int64) * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


# Backward, one program per (batch b, block of ROWS tokens), walking its rows; with xhat = (x - mean) * rstd and
# g = dout * (1 + scale[b]):
#   dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))            (per row)
#   dshift[b] = sum_t dout,  dscale[b] = sum_t dout * xhat           (per (b, token block): fp32 partial rows)
# The partials go to fp32 (B, n_blocks, D) buffers and are summed over blocks afterwards: no atomics, the same order
# every run, so the gradients are bitwise deterministic.


@triton_kernel
def _modulated_layer_norm_bwd_kernel(
    dout_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
    T, D, ROWS, n_blocks,
    stride_xb, stride_xt,
    stride_dob, stride_dot,
    stride_scale_b, stride_scale_d,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # b * n_blocks + block
    b = pid // n_blocks
    t_start = (pid % n_blocks) * ROWS
    t_end = tl.minimum(t_start + ROWS, T)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    scale1 = 1.0 + tl.load(scale_ptr + b * stride_scale_b + cols * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    row = b.to(tl.int64) * T + t_start  # advanced with the loop, as are the row pointers
    x_ptrs = x_ptr + b.to(tl.int64) * stride_xb + t_start.to(tl.int64) * stride_xt + cols
    dout_ptrs = dout_ptr + b.to(tl.int64) * stride_dob + t_start.to(tl.int64) * stride_dot + cols
    for _ in range(t_start, t_end):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptrs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dshift += dout
        dscale += dout * xhat
        g = dout * scale1
        c_xhat = tl.sum(g * xhat, axis=0) / D
        c_mean = tl.sum(g, axis=0) / D
        dx = (g - xhat * c_xhat - c_mean) * rstd
        tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        row += 1
        x_ptrs += stride_xt
        dout_ptrs += stride_dot
    tl.store(dshift_part_ptr + pid.to(tl.int64) * D + cols, dshift, mask=mask)
    tl.store(dscale_part_ptr + pid.to(tl.int64) * D + cols, dscale, mask=mask)


def _check_inputs(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    check_tensor("x", x, 3)
    check_modulation("shift", shift, x)
    check_modulation("scale", scale, x)


def modulated_layer_norm_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no autograd): x (B, T, D), shift/scale (B, D) -> (out (B, T, D), mean, rstd (B, T)).

    ``mean``/``rstd`` are fp32 row statistics for :func:`modulated_layer_norm_bwd`.
    """
    _check_inputs(x, shift, scale)
    x = last_dim_contiguous(x)
    B, T, D = x.shape
    check_row_dim(D)
    out = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    mean = torch.empty((B, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, T), dtype=torch.float32, device=x.device)
    if B * T == 0:
        return out, mean, rstd
    block_d, num_warps = row_config(D)
    _modulated_layer_norm_fwd_kernel[(B * T,)](
        x, shift, scale, out, mean, rstd,
        T, D,
        x.stride(0), x.stride(1),
        shift.stride(0), shift.stride(1),
        scale.stride(0), scale.stride(1),
        eps,
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return out, mean, rstd


def modulated_layer_norm_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel (no autograd): grads (dx (B, T, D), dshift (B, D), dscale (B, D)).

    ``grad_out`` and ``x`` are (B, T, D), ``scale`` (B, D), ``mean``/``rstd`` the fp32 (B, T) forward statistics.
    dshift/dscale are summed over tokens deterministically (per-block fp32 partials, then one reduction).
    """
    check_tensor("grad_out", grad_out, 3)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != x shape {tuple(x.shape)}")
    x = last_dim_contiguous(x)
    grad_out = last_dim_contiguous(grad_out)
    B, T, D = x.shape
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    rows = bwd_rows_per_program(B, T)
    n_blocks = -(-T // rows)
    dshift_part = torch.empty((B, n_blocks, D), dtype=torch.float32, device=x.device)
    dscale_part = torch.empty((B, n_blocks, D), dtype=torch.float32, device=x.device)
    if B * T > 0:
        block_d, num_warps = row_config(D)
        _modulated_layer_norm_bwd_kernel[(B * n_blocks,)](
            grad_out, x, scale, mean, rstd, dx, dshift_part, dscale_part,
            T, D, rows, n_blocks,
            x.stride(0), x.stride(1),
            grad_out.stride(0), grad_out.stride(1),
            scale.stride(0), scale.stride(1),
            BLOCK_D=block_d, num_warps=num_warps,
        )
    return dx, dshift_part.sum(dim=1).to(scale.dtype), dscale_part.sum(dim=1).to(scale.dtype)


_fwd_op = register_op("dit_fast::modulated_layer_norm", modulated_layer_norm_fwd)
_bwd_op = register_op("dit_fast::modulated_layer_norm_bwd", modulated_layer_norm_bwd)


def _setup_context(ctx, inputs, output) -> None:
    x, _shift, scale, _eps = inputs
    _out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _bwd_op(grad_out, x, scale, mean, rstd)
    return dx, dshift, dscale, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def modulated_layer_norm_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                             eps: float = 1e-6) -> torch.Tensor:
    """Plain-PyTorch oracle: ``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]``, the official ``modulate``.

    x (B, T, D), shift/scale (B, D) -> (B, T, D); LayerNorm without affine parameters.
    """
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]`` in one pass over x, differentiable.

    Args:
        x: (B, T, D) tokens, fp32/fp16/bf16.
        shift, scale: (B, D), same dtype and device; any strides (e.g. chunks of ``adaLN_modulation(c)``).
        eps: LayerNorm epsilon (DiT uses 1e-6).

    Returns:
        (B, T, D), x's dtype. CUDA tensors run the Triton kernels; CPU tensors the reference (or the kernels in the
        Triton interpreter with ``TRITON_INTERPRET=1``).
    """
    _check_inputs(x, shift, scale)
    if not use_triton(x):
        return modulated_layer_norm_ref(x, shift, scale, eps)
    return _fwd_op(x, shift, scale, float(eps))[0]


def compile_cases(dtype: torch.dtype, dims: Sequence[int]) -> list[CompileCase]:
    """The kernel specialisations launched for ``dtype`` tensors of hidden sizes ``dims`` (for ``compile_check``)."""
    t = triton_dtype(dtype)
    fwd = {"x_ptr": t, "shift_ptr": t, "scale_ptr": t, "out_ptr": t, "mean_ptr": "fp32", "rstd_ptr": "fp32"}
    bwd = {"dout_ptr": t, "x_ptr": t, "scale_ptr": t, "mean_ptr": "fp32", "rstd_ptr": "fp32", "dx_ptr": t,
           "dshift_part_ptr": "fp32", "dscale_part_ptr": "fp32"}
    return row_compile_cases([(_modulated_layer_norm_fwd_kernel, fwd, {}), (_modulated_layer_norm_bwd_kernel, bwd, {})],
                             dims)
