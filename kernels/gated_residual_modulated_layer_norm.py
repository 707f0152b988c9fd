"""The DiT block boundary in one pass: ``r = x + gate * y`` and ``out = layer_norm(r) * (1 + scale) + shift``.

One read of x and y, one write of r (the residual stream, for the next residual add) and of out (the next branch's
input). Four layers: the row kernels of ``_row.py`` with ``HAS_RESIDUAL`` and ``HAS_NORM``; the launchers
``gated_residual_modulated_layer_norm_fwd/_bwd`` (no autograd); the custom ops
``dit_fast::gated_residual_modulated_layer_norm`` (+ autograd) and
``dit_fast::gated_residual_modulated_layer_norm_bwd``, which ``torch.compile(fullgraph=True)`` traces through; and the
public ``gated_residual_modulated_layer_norm`` beside its plain-PyTorch oracle
``gated_residual_modulated_layer_norm_ref``.

Mixed precision (autocast): x may be fp32 while gate/y/shift/scale are bf16/fp16; r keeps x's dtype, out comes out
in shift/scale's dtype (what the next linear reads: no cast kernels around the op), the math is fp32, each gradient
comes in its input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import (
    Launch,
    capture_launches,
    check_device,
    check_modulation,
    check_same_dtype,
    check_tensor,
    register_op,
    use_triton,
)
from ._row import compile_inputs, row_backward, row_forward
from .gated_residual import gated_residual_ref  # also registers dit_fast::gated_residual_bwd
from .modulated_layer_norm import modulated_layer_norm_ref


def _check_inputs(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                  scale: torch.Tensor) -> None:
    check_tensor("x", x, 3)
    check_tensor("y", y, 3)
    if y.shape != x.shape:
        raise ValueError(f"y shape {tuple(y.shape)} != x shape {tuple(x.shape)}")
    check_device("x", x, [("y", y)])
    check_modulation("gate", gate, x)
    check_modulation("shift", shift, x)
    check_modulation("scale", scale, x)
    check_same_dtype(("shift", "scale"), shift, scale, "the normalised output takes their dtype")


def gated_residual_modulated_layer_norm_fwd(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no autograd): -> (r (B, T, D) in x's dtype, out (B, T, D) in shift's dtype, mean,
    rstd (B, T) fp32 statistics of r).

    x, y (B, T, D); gate, shift, scale (B, D).
    """
    _check_inputs(x, gate, y, shift, scale)
    return row_forward(x, gate, y, shift, scale, eps)


def gated_residual_modulated_layer_norm_bwd(
    grad_r: torch.Tensor | None, grad_out: torch.Tensor, r: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
    scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel (no autograd): grads (dx, dgate, dy, dshift, dscale) given those of r and out.

    ``grad_r`` (or None for zero), ``grad_out``, ``r``, ``y``: (B, T, D); ``gate``/``scale`` (B, D); ``mean``/``rstd``
    the fp32 (B, T) statistics of r. Each grad in its input's dtype (dx in r's = x's); token sums (dgate, dshift,
    dscale) are deterministic (fp32 partials, reduced).
    """
    check_tensor("grad_out", grad_out, 3)
    if grad_out.shape != r.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != r shape {tuple(r.shape)}")
    if grad_r is not None and grad_r.shape != r.shape:
        raise ValueError(f"grad_r shape {tuple(grad_r.shape)} != r shape {tuple(r.shape)}")
    dx, dy, dgate, dshift, dscale = row_backward(grad_r, grad_out, r, y, gate, scale, mean, rstd, tuple(r.shape))
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
    if grad_out is None:  # only r is used: the gated residual's backward, no LayerNorm terms (shift/scale get none)
        if grad_r is None:
            return None, None, None, None, None, None
        dgate, dy = torch.ops.dit_fast.gated_residual_bwd(grad_r, gate, y)
        return grad_r, dgate, dy, None, None, None
    dx, dgate, dy, dshift, dscale = _bwd_op(grad_r, grad_out, r, y, gate, scale, mean, rstd)
    return dx, dgate, dy, dshift, dscale, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def gated_residual_modulated_layer_norm_ref(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch oracle: ``r = gated_residual_ref(x, gate, y)`` (x's dtype) and
    ``(r, modulated_layer_norm_ref(r, shift, scale, eps))`` (shift's dtype)."""
    r = gated_residual_ref(x, gate, y)
    return r, modulated_layer_norm_ref(r, shift, scale, eps)


def gated_residual_modulated_layer_norm(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block boundary in one pass: ``r = x + gate[:, None] * y`` and the next branch's modulated LayerNorm of r.

    Args:
        x: (B, T, D) residual stream, fp32/fp16/bf16.
        gate: (B, D) gate of the branch just computed (e.g. ``gate_msa``); any float dtype, any strides.
        y: (B, T, D) that branch's output, any float dtype.
        shift, scale: (B, D) modulation of the next branch (e.g. ``shift_mlp``, ``scale_mlp``), one float dtype; any
            strides.
        eps: LayerNorm epsilon (DiT uses 1e-6).

    Returns:
        ``(r, out)``, both (B, T, D): r in x's dtype, ``out = layer_norm(r) * (1 + scale[:, None]) + shift[:, None]``
        in shift/scale's dtype, computed in fp32; differentiable through both. CUDA tensors run the Triton kernels;
        CPU tensors the reference (or the kernels in the Triton interpreter with ``TRITON_INTERPRET=1``).
    """
    _check_inputs(x, gate, y, shift, scale)
    if not use_triton(x):
        return gated_residual_modulated_layer_norm_ref(x, gate, y, shift, scale, eps)
    r, out, _mean, _rstd = _fwd_op(x, gate, y, shift, scale, float(eps))
    return r, out


def compile_cases(x_dtype: torch.dtype, mod_dtype: torch.dtype, dims: Sequence[int]) -> list[tuple[str, Launch]]:
    """The launches (kernel, constexprs, argument dtypes and shapes) of a DiT-shaped forward and both backwards (with
    and without a gradient of r), stream in ``x_dtype``, the rest in ``mod_dtype``, per hidden size (``compile_check``).
    """
    cases = []
    for dim in dims:
        a = compile_inputs(x_dtype, mod_dtype, dim)
        with capture_launches() as launches:
            gated_residual_modulated_layer_norm_fwd(a["x"], a["gate"], a["y"], a["shift"], a["scale"], 1e-6)
            for grad_r in (a["grad_r"], None):
                gated_residual_modulated_layer_norm_bwd(grad_r, a["grad_out"], a["x"], a["y"], a["gate"], a["scale"],
                                                        a["mean"], a["rstd"])
        labels = ("fwd", "bwd", "bwd (no grad of r)")
        cases += [(f"gated_residual_modulated_layer_norm {label} D={dim}", launch)
                  for label, launch in zip(labels, launches, strict=True)]
    return cases
