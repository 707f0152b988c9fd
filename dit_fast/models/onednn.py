"""``fused_linear``: DiTFast's linears on the CPU through oneDNN, with the bias (and the GELU) fused into the GEMM.

``onednn_linear`` is a ``torch.library`` custom op (``dit_fast::onednn_linear``) over oneDNN's pointwise-fused linear,
with its own backward; ``fused_linear(x, layer, gelu)`` routes a plain ``nn.Linear`` through it where it applies (CPU,
fp32/bf16, no autocast, no hooks) and calls the module everywhere else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _autocasting(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


@torch.library.custom_op("dit_fast::onednn_linear", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, bool gelu) -> Tensor")
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """CPU linear through oneDNN with the bias (and, for inference, tanh-GELU) fused into the GEMM.

    x (..., K), weight (N, K) (any strides), bias (N,) or None -> (..., N). A custom op, so ``torch.compile`` keeps it
    as one opaque call (inductor lowers oneDNN's own op only for frozen weights); differentiable without the GELU
    (the input gradient through oneDNN too; the weight gradient, a GEMM over transposed operands, through ``mm``).
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                              "tanh" if gelu else "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, gelu = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.gelu = gelu


def _onednn_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    if ctx.gelu:
        raise RuntimeError("onednn_linear with the fused GELU is inference-only; apply F.gelu after it to train")
    x, weight = ctx.saved_tensors
    grad_2d = grad.reshape(-1, grad.shape[-1])  # (M, N)
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t(), None, False)  # (..., N) @ (N, K) -> (..., K)
    if ctx.needs_input_grad[1]:
        grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))  # (N, M) @ (M, K): BLAS reads the transpose
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_2d.sum(0)  # (N,)
    return grad_x, grad_weight, grad_bias, None


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup_context)
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # CPUs without bf16 GEMMs fail to build one


def fused_linear(x: torch.Tensor, layer: nn.Module, gelu: bool = False) -> torch.Tensor:
    """``layer(x)`` (then tanh-GELU when ``gelu``): (..., K) -> (..., N).

    On the CPU (fp32/bf16, no autocast, a plain ``nn.Linear`` without hooks) this runs ``onednn_linear``: oneDNN's
    AVX-512 GEMMs with the bias in the epilogue (and the GELU too when no gradient is needed) beat ``F.linear``'s
    BLAS call plus separate bias and GELU passes, forward and backward. Everything else calls the module.
    """
    weight = getattr(layer, "weight", None)
    if (
        _ONEDNN
        and x.device.type == "cpu"
        and type(layer) is nn.Linear
        and x.dtype == weight.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _ONEDNN_BF16))
        and not _autocasting("cpu")
        and not (layer._forward_hooks or layer._forward_pre_hooks)
    ):
        bias = layer.bias
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))
        if not needs_grad:
            return onednn_linear(x, weight, bias, gelu)
        out = onednn_linear(x, weight, bias, False)
    else:
        out = layer(x)
    return F.gelu(out, approximate="tanh") if gelu else out
