"""Linear + bias + tanh-GELU with the bias and the GELU in the GEMM's epilogue on CUDA: the MLP's fc1 in DiT.

``torch._addmm_activation(bias, x, weight.t(), use_gelu=True)`` on CUDA runs cuBLASLt with the
``CUBLASLT_EPILOGUE_GELU_BIAS`` epilogue, which applies the tanh approximation of GELU, the one DiT uses
(``nn.GELU(approximate="tanh")``). PyTorch states it in its own code: where it cannot use the Lt epilogue it applies
``at::gelu_(result, "tanh")`` instead (``aten/src/ATen/native/cuda/Blas.cpp``), and its decomposition
(``torch/_decomp/decompositions.py``, ``_addmm_activation``) uses ``gelu(out, approximate="tanh")`` for CUDA tensors.
On the CPU the same op applies the exact erf GELU (``addmm_activation_out_cpu`` calls ``at::gelu_`` with the default
``approximate="none"``), so it is never used there: CPU tensors run ``linear_gelu_ref``.

One GEMM writes the activation directly: the pre-activation never goes to memory, and the separate GELU kernel (a read
and a write of the (M, 4D) activation) disappears. Differentiable: the backward recomputes the pre-activation with one
``addmm`` (the forward does not store it), then ``gelu_backward`` and the two GEMMs of a linear. That recompute costs a
GEMM of the forward's size, more than the elementwise pass it saves at DiT's widths, so the model runs this op where
no gradient is needed (inference, sampling) and keeps ``linear`` + ``gelu`` (which saves the pre-activation) for
training; the backward is for callers that prefer the memory (no (M, 4D) pre-activation kept per layer).

Layers, as for the Triton ops: the custom op ``dit_fast::linear_gelu`` (+ autograd), opaque to ``torch.compile``; the
public ``linear_gelu`` (dispatch: CUDA runs the op, everything else the reference) beside ``linear_gelu_ref``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _check_inputs(x: Any, weight: Any, bias: Any) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"weight must be (N, K) and bias (N,), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim must be K = {weight.shape[1]} (weight {tuple(weight.shape)}), got shape "
                         f"{tuple(x.shape)}")


@torch.library.custom_op("dit_fast::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x @ weight.T + bias)``: x (..., K), weight (N, K), bias (N,), one dtype -> (..., N).

    CUDA: one cuBLASLt GEMM with the bias + GELU epilogue. Elsewhere ``addmm`` then tanh-GELU (``_addmm_activation``
    would apply the erf GELU there), which lets the op and its backward be checked without a GPU.
    """
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    if x.is_cuda:
        out = torch._addmm_activation(bias, x2d, weight.t(), use_gelu=True)  # (M, N)
    else:
        out = F.gelu(torch.addmm(bias, x2d, weight.t()), approximate="tanh")
    return out.reshape(*x.shape[:-1], weight.shape[0])


@_linear_gelu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias = ctx.saved_tensors
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    pre = torch.addmm(bias, x2d, weight.t())  # (M, N) pre-activation, recomputed (the forward did not keep it)
    grad_pre = torch.ops.aten.gelu_backward(grad.reshape(pre.shape), pre, approximate="tanh")  # (M, N)
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_pre.mm(weight).reshape(x.shape)  # (M, N) @ (N, K)
    if ctx.needs_input_grad[1]:
        grad_weight = grad_pre.t().mm(x2d)  # (N, M) @ (M, K)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_pre.sum(0)  # (N,)
    return grad_x, grad_weight, grad_bias


_linear_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch oracle: ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``, the official fc1 + GELU."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x @ weight.T + bias)`` with the bias and GELU in the GEMM epilogue on CUDA, differentiable.

    Args:
        x: (..., K) fp32/fp16/bf16.
        weight: (N, K) and bias (N,), e.g. ``mlp.fc1.weight`` / ``mlp.fc1.bias``.

    Returns:
        (..., N). CUDA tensors run ``dit_fast::linear_gelu`` (one cuBLASLt GEMM); under autocast the operands are
        cast to the autocast dtype first, as ``F.linear`` would, but on every call: autocast's cache of weight casts
        (which lasts one ``torch.autocast`` context) is not reachable from Python, so inside one context spanning
        many forwards ``F.linear`` reuses its cast where this casts again. Other devices run
        :func:`linear_gelu_ref`.
    """
    _check_inputs(x, weight, bias)
    if not x.is_cuda:
        return linear_gelu_ref(x, weight, bias)
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    elif not x.dtype == weight.dtype == bias.dtype:
        raise TypeError(f"x, weight and bias must share a dtype outside autocast, got {x.dtype}, {weight.dtype}, "
                        f"{bias.dtype}")
    return _linear_gelu_op(x, weight, bias)
