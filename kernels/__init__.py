"""Fused Triton kernels for DiT, installed as ``dit_fast.kernels``.

Each op is differentiable, takes fp32/fp16/bf16 and any hidden size, and dispatches on its input's device: CUDA
tensors run the Triton kernels (registered as ``torch.ops.dit_fast.<op>`` custom ops, so ``torch.compile(
fullgraph=True)`` traces through them), CPU tensors run ``<op>_ref`` (plain PyTorch), or the Triton kernels in the
interpreter when ``TRITON_INTERPRET=1``. ``python -m dit_fast.kernels.compile_check`` compiles every kernel for
sm_80 and sm_90 without a GPU. ``linear`` (every linear, fc1 with its GELU) is no Triton kernel: it routes each GEMM
with its fused epilogue per device (cuBLASLt's bias + tanh-GELU on CUDA via ``linear_gelu``, oneDNN on the CPU).
``dit_fast.kernels.registry`` holds the kernel sets a DiTFast forward chooses from.

This folder is reached only as ``dit_fast.kernels``: installed through the wheel, or in a checkout through the
``dit_fast/kernels`` symlink. Imported as a bare top-level ``kernels`` (the name of Hugging Face's package) it
refuses, so the ``dit_fast::`` custom ops are never registered twice.
"""

if __name__ != "dit_fast.kernels":
    raise ImportError(f"import this package as dit_fast.kernels, not as {__name__!r}")

from .gated_residual import gated_residual, gated_residual_ref
from .gated_residual_modulated_layer_norm import (
    gated_residual_modulated_layer_norm,
    gated_residual_modulated_layer_norm_ref,
)
from .linear import linear, linear_ref
from .linear_gelu import linear_gelu, linear_gelu_ref
from .modulated_layer_norm import modulated_layer_norm, modulated_layer_norm_ref
from .patchify import patchify, patchify_ref
from .registry import KERNELS, KernelOps, require_kernels, resolve_kernels
from .unpatchify import unpatchify, unpatchify_ref

__all__ = [
    "KERNELS",
    "KernelOps",
    "gated_residual",
    "gated_residual_modulated_layer_norm",
    "gated_residual_modulated_layer_norm_ref",
    "gated_residual_ref",
    "linear",
    "linear_gelu",
    "linear_gelu_ref",
    "linear_ref",
    "modulated_layer_norm",
    "modulated_layer_norm_ref",
    "patchify",
    "patchify_ref",
    "require_kernels",
    "resolve_kernels",
    "unpatchify",
    "unpatchify_ref",
]
