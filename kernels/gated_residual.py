"""Gated residual, the adaLN-Zero branch merge of every DiT block: ``x + gate * y``.

Four layers: the row kernels of ``_row.py`` with ``HAS_RESIDUAL`` (no norm); the launchers ``gated_residual_fwd/_bwd``
(no autograd); the custom ops ``dit_fast::gated_residual`` (+ autograd) and ``dit_fast::gated_residual_bwd``, which
``torch.compile(fullgraph=True)`` traces through; and the public ``gated_residual`` beside its plain-PyTorch oracle
``gated_residual_ref``.

Mixed precision: x (the residual stream) may be fp32 while gate and y are bf16/fp16 (autocast); the result keeps x's
dtype, the math is fp32, each gradient comes in its input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import Launch, capture_launches, check_device, check_modulation, check_tensor, register_op, use_triton
from ._row import compile_inputs, row_backward, row_forward


def _check_inputs(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    check_tensor("x", x, 3)
    check_tensor("y", y, 3)
    if y.shape != x.shape:
        raise ValueError(f"y shape {tuple(y.shape)} != x shape {tuple(x.shape)}")
    check_device("x", x, [("y", y)])
    check_modulation("gate", gate, x)


def gated_residual_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel (no autograd): x, y (B, T, D), gate (B, D) -> r (B, T, D) in x's dtype."""
    _check_inputs(x, gate, y)
    r, _, _, _ = row_forward(x, gate, y, None, None, 0.0)
    return r


def gated_residual_bwd(grad_r: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel (no autograd): grads (dgate (B, D), dy (B, T, D)); dx is ``grad_r`` itself.

    dgate is summed over tokens deterministically (per-block fp32 partials, then one reduction), in gate's dtype; dy
    comes in y's dtype.
    """
    check_tensor("grad_r", grad_r, 3)
    if grad_r.shape != y.shape:
        raise ValueError(f"grad_r shape {tuple(grad_r.shape)} != y shape {tuple(y.shape)}")
    _, dy, dgate, _, _ = row_backward(grad_r, None, None, y, gate, None, None, None, tuple(y.shape))
    return dgate, dy


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
    """Plain-PyTorch oracle: ``x + gate[:, None] * y`` in x's dtype; x, y (B, T, D), gate (B, D) -> (B, T, D).

    With mixed dtypes PyTorch's type promotion applies (under autocast: the bf16 product added to the fp32 stream,
    as the reference DiT computes it), then the sum is cast to x's dtype (a no-op when it already is).
    """
    return (x + gate.unsqueeze(1) * y).to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None] * y`` in one pass, differentiable.

    Args:
        x: (B, T, D) residual stream, fp32/fp16/bf16.
        gate: (B, D), any float dtype, x's device; any strides (e.g. a chunk of ``adaLN_modulation(c)``).
        y: (B, T, D) branch output (attention or MLP), any float dtype.

    Returns:
        (B, T, D) in x's dtype, computed in fp32. CUDA tensors run the Triton kernels; CPU tensors the reference (or
        the kernels in the Triton interpreter with ``TRITON_INTERPRET=1``).
    """
    _check_inputs(x, gate, y)
    if not use_triton(x):
        return gated_residual_ref(x, gate, y)
    return _fwd_op(x, gate, y)


def compile_cases(x_dtype: torch.dtype, mod_dtype: torch.dtype, dims: Sequence[int]) -> list[tuple[str, Launch]]:
    """The launches (kernel, constexprs, argument dtypes and shapes) of a DiT-shaped forward and backward, residual
    stream in ``x_dtype`` and gate/branch in ``mod_dtype``, for each hidden size in ``dims`` (``compile_check``)."""
    cases = []
    for dim in dims:
        a = compile_inputs(x_dtype, mod_dtype, dim)
        with capture_launches() as launches:
            gated_residual_fwd(a["x"], a["gate"], a["y"])
            gated_residual_bwd(a["grad_r"], a["gate"], a["y"])
        cases += [(f"gated_residual {label} D={dim}", launch) for label, launch in zip(("fwd", "bwd"), launches,
                                                                                         strict=True)]
    return cases
