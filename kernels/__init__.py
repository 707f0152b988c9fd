"""Fused Triton kernels for DiT, installed as ``dit_fast.kernels``.

Each op is differentiable, takes fp32/fp16/bf16 and any hidden size, and dispatches on its input's device: CUDA
tensors run the Triton kernels (registered as ``torch.ops.dit_fast.<op>`` custom ops, so ``torch.compile(
fullgraph=True)`` traces through them), CPU tensors run ``<op>_ref`` (plain PyTorch), or the Triton kernels in the
interpreter when ``TRITON_INTERPRET=1``. ``python -m dit_fast.kernels.compile_check`` compiles every kernel for
sm_80 and sm_90 without a GPU.
"""

from .gated_residual import gated_residual, gated_residual_ref
from .gated_residual_modulated_layer_norm import (
    gated_residual_modulated_layer_norm,
    gated_residual_modulated_layer_norm_ref,
)
from .modulated_layer_norm import modulated_layer_norm, modulated_layer_norm_ref
from .patchify import patchify, patchify_ref
from .unpatchify import unpatchify, unpatchify_ref

__all__ = [
    "gated_residual",
    "gated_residual_modulated_layer_norm",
    "gated_residual_modulated_layer_norm_ref",
    "gated_residual_ref",
    "modulated_layer_norm",
    "modulated_layer_norm_ref",
    "patchify",
    "patchify_ref",
    "unpatchify",
    "unpatchify_ref",
]
