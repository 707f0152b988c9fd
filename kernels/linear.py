"""Linear (+ bias, + tanh-GELU) with the epilogue fused into the GEMM, on the fastest route of each device and dtype.

``linear(x, weight, bias, gelu)`` is DiT's every linear layer (qkv, proj, fc1 with the GELU, fc2, the final layer).
One op, routed per call on the input's device, dtype and whether a gradient is needed:

- CUDA, ``gelu`` without gradients: one cuBLASLt GEMM with the bias + tanh-GELU epilogue (``linear_gelu``); otherwise
  ``F.linear`` (cuBLAS, bias in its epilogue) then the GELU.
- CPU, fp32: oneDNN's pointwise-fused linear (``dit_fast::onednn_linear``, bias and, for inference, the GELU in the
  epilogue), which beats MKL's ``F.linear`` plus separate bias and GELU passes at DiT's shapes.
- CPU, bf16/fp16, where oneDNN has a reduced-precision GEMM (AVX512/AMX CPUs): the same op in that dtype. Where it has
  none (AVX2-only CPUs, e.g. AMD Zen 3), oneDNN refuses bf16 and ``F.linear`` in bf16 falls back to a scalar loop 5-7x
  slower than fp32, so the operands are widened to fp32 (exact: a bf16/fp16 value is an fp32 value), the GEMM runs
  in fp32 and the result is rounded once to the input dtype: a bf16 GEMM with fp32 accumulation, at fp32 speed.
- CPU, fp32 activations with bf16/fp16 weights on such a CPU (``DiTFast.for_inference`` there: weight-only bf16):
  the weight widened per call, the GEMM and its output in fp32.
- Autocast, other dtypes or devices: ``linear_ref``.

``linear_ref`` is the plain-PyTorch oracle (``F.linear`` then ``F.gelu(approximate="tanh")``), the "torch" kernel
set's linear. The oneDNN op is a ``torch.library`` custom op, so ``torch.compile`` keeps it as one opaque call
(inductor lowers oneDNN's own op only for frozen weights); differentiable without the GELU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from .linear_gelu import linear_gelu

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_REDUCED = (torch.bfloat16, torch.float16)


@torch.library.custom_op("dit_fast::onednn_linear", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, bool gelu) -> Tensor")
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """CPU linear through oneDNN with the bias (and, for inference, tanh-GELU) fused into the GEMM.

    x (..., K), weight (N, K) (any strides), bias (N,) or None, one dtype -> (..., N) in that dtype. bf16/fp16 where
    oneDNN has no GEMM for them run in fp32 on widened operands inside the op (one op in a trace, as on a CPU that
    has one). Differentiable without the GELU (the input gradient through oneDNN too; the weight gradient through
    ``mm``).
    """
    dtype = x.dtype
    if dtype != torch.float32 and not onednn_supports(dtype):
        x, weight, bias = x.float(), weight.float(), None if bias is None else bias.float()
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "tanh" if gelu else "")
    return out.to(dtype)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, gelu = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.gelu = gelu


def _onednn_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
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


onednn_linear.register_autograd(_onednn_backward, setup_context=_onednn_setup_context)


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs a linear in ``dtype`` on this CPU (probed once with a tiny GEMM; fp32 wherever it is built).

    bf16/fp16 need AVX512 (or AMX / Arm BF16): on AVX2-only CPUs oneDNN cannot create the primitive.
    """
    if not _ONEDNN:
        return False
    try:
        x = torch.ones(2, 16, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, torch.ones(8, 16, dtype=dtype), None, "none", [], "")
    except RuntimeError:
        return False
    return True


@torch.compiler.assume_constant_result
def cpu_linear_route(dtype: torch.dtype) -> str:
    """The route ``linear`` takes for CPU tensors of ``dtype`` outside autocast: "onednn" (in ``dtype``),
    "onednn-fp32" (bf16/fp16 operands widened to fp32, the result rounded back) or "torch" (``linear_ref``).
    A constant for the compiler (the probe runs eagerly, never on fake tensors)."""
    if dtype in (torch.float32, *_REDUCED) and onednn_supports(dtype):
        return "onednn"
    if dtype in _REDUCED and onednn_supports(torch.float32):
        return "onednn-fp32"
    return "torch"


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               gelu: bool = False) -> torch.Tensor:
    """Plain-PyTorch oracle: ``F.linear(x, weight, bias)``, then ``F.gelu(approximate="tanh")`` when ``gelu``."""
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if gelu else out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` (then tanh-GELU when ``gelu``) on the fastest route here (see the module docstring).

    Args:
        x: (..., K); weight (N, K); bias (N,) or None; one dtype outside autocast (or fp32 x with bf16/fp16 weights
            on a CPU without a bf16/fp16 GEMM).
        gelu: apply DiT's tanh-GELU (fused into the GEMM's epilogue where no gradient is needed).

    Returns:
        (..., N) in x's dtype (autocast's under autocast). Differentiable on every route.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if x.is_cuda:
        if gelu and bias is not None and not needs_grad:
            return linear_gelu(x, weight, bias)  # cuBLASLt, bias + GELU epilogue
        return linear_ref(x, weight, bias, gelu)
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return linear_ref(x, weight, bias, gelu)
    if x.dtype == torch.float32 and weight.dtype in _REDUCED and cpu_linear_route(weight.dtype) == "onednn-fp32":
        weight, bias = weight.float(), None if bias is None else bias.float()  # weight-only bf16: fp32 activations
    if not (x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)):
        return linear_ref(x, weight, bias, gelu)
    if cpu_linear_route(x.dtype) == "torch":
        return linear_ref(x, weight, bias, gelu)
    out = onednn_linear(x, weight, bias, gelu and not needs_grad)  # bf16 widened inside where the CPU needs it
    return F.gelu(out, approximate="tanh") if gelu and needs_grad else out
