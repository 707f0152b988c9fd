"""Modulated LayerNorm, the adaLN input of every DiT block: ``layer_norm(x) * (1 + scale) + shift``.

Four layers: the row kernels of ``_row.py`` with ``HAS_NORM`` (no residual); the launchers
``modulated_layer_norm_fwd/_bwd`` (no autograd); the custom ops ``dit_fast::modulated_layer_norm`` (+ autograd) and
``dit_fast::modulated_layer_norm_bwd``, which ``torch.compile(fullgraph=True)`` traces through; and the public
``modulated_layer_norm`` beside its plain-PyTorch oracle ``modulated_layer_norm_ref``.

Mixed precision: x may be fp32 while shift/scale are bf16/fp16 (autocast); the output comes out in shift/scale's
dtype (what the next linear reads), the math is fp32, each gradient comes in its input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._common import (
    Launch,
    capture_launches,
    check_modulation,
    check_same_dtype,
    check_tensor,
    register_op,
    use_triton,
)
from ._row import compile_inputs, row_backward, row_forward


def _check_inputs(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    check_tensor("x", x, 3)
    check_modulation("shift", shift, x)
    check_modulation("scale", scale, x)
    check_same_dtype(("shift", "scale"), shift, scale, "the output takes their dtype")


def modulated_layer_norm_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no autograd): x (B, T, D), shift/scale (B, D) -> (out (B, T, D) in shift's dtype,
    mean, rstd (B, T)); ``mean``/``rstd`` are fp32 row statistics for :func:`modulated_layer_norm_bwd`."""
    _check_inputs(x, shift, scale)
    _, out, mean, rstd = row_forward(x, None, None, shift, scale, eps)
    return out, mean, rstd


def modulated_layer_norm_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel (no autograd): grads (dx (B, T, D) in x's dtype, dshift, dscale (B, D) in scale's).

    ``grad_out`` and ``x`` are (B, T, D), ``scale`` (B, D), ``mean``/``rstd`` the fp32 (B, T) forward statistics.
    dshift/dscale are summed over tokens deterministically (per-block fp32 partials, then one reduction).
    """
    check_tensor("grad_out", grad_out, 3)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != x shape {tuple(x.shape)}")
    dx, _, _, dshift, dscale = row_backward(None, grad_out, x, None, None, scale, mean, rstd, tuple(x.shape))
    return dx, dshift, dscale


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

    x (B, T, D), shift/scale (B, D) -> (B, T, D) in shift's dtype; LayerNorm without affine parameters. With mixed
    dtypes PyTorch's type promotion applies (under autocast: the fp32 norm modulated by bf16 shift/scale, as the
    reference DiT computes it), then the result is cast to shift's dtype (a no-op when it already is).
    """
    return (F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)).to(shift.dtype)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]`` in one pass over x, differentiable.

    Args:
        x: (B, T, D) tokens, fp32/fp16/bf16.
        shift, scale: (B, D), one float dtype (any, e.g. bf16 under autocast with an fp32 x), x's device; any strides
            (e.g. chunks of ``adaLN_modulation(c)``).
        eps: LayerNorm epsilon (DiT uses 1e-6).

    Returns:
        (B, T, D) in shift/scale's dtype, computed in fp32. CUDA tensors run the Triton kernels; CPU tensors the
        reference (or the kernels in the Triton interpreter with ``TRITON_INTERPRET=1``).
    """
    _check_inputs(x, shift, scale)
    if not use_triton(x):
        return modulated_layer_norm_ref(x, shift, scale, eps)
    return _fwd_op(x, shift, scale, float(eps))[0]


def compile_cases(x_dtype: torch.dtype, mod_dtype: torch.dtype, dims: Sequence[int]) -> list[tuple[str, Launch]]:
    """The launches (kernel, constexprs, argument dtypes and shapes) of a DiT-shaped forward and backward, x in
    ``x_dtype`` and shift/scale in ``mod_dtype``, for each hidden size in ``dims`` (``compile_check``)."""
    cases = []
    for dim in dims:
        a = compile_inputs(x_dtype, mod_dtype, dim)
        with capture_launches() as launches:
            modulated_layer_norm_fwd(a["x"], a["shift"], a["scale"], 1e-6)
            modulated_layer_norm_bwd(a["grad_out"], a["x"], a["scale"], a["mean"], a["rstd"])
        cases += [(f"modulated_layer_norm {label} D={dim}", launch)
                  for label, launch in zip(("fwd", "bwd"), launches, strict=True)]
    return cases
