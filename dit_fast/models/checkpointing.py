"""Activation checkpointing of DiT blocks: none, full, or selective (keep the GEMM and attention outputs, recompute
the rest).

``full`` recomputes a whole block in the backward (the least memory: one (N, T, D) input saved per block; a second
forward's worth of FLOPs). ``selective`` keeps what is expensive to recompute, the outputs of the matmuls (qkv, proj,
fc1, fc2, the adaLN linear; cuBLAS, oneDNN, FP8 ``_scaled_mm``) and of the attention kernels (with their
log-sum-exp), and recomputes what is cheap and memory-hungry: the modulated LayerNorms, the GELU, the gated residuals,
casts and reshapes (PyTorch's selective activation checkpointing, ``create_selective_checkpoint_contexts``). It
saves roughly the 4D-wide GELU input and output and the normalised rows (about half a block's activations) for a
recompute of a few memory-bound kernels, where full checkpointing repeats every GEMM.

Gradients are the same in every mode (the recomputation is deterministic; tests/test_checkpointing.py checks them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")


@functools.cache
def _saved_ops() -> frozenset[Any]:
    """The ops whose outputs selective checkpointing keeps: GEMMs and attention (those present in this torch)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    custom = getattr(torch.ops, "dit_fast", None)
    if custom is not None and hasattr(custom, "onednn_linear"):
        ops.add(custom.onednn_linear.default)
    return frozenset(ops)


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_mode(value: bool | str | None) -> str:
    """Normalise a ``gradient_checkpointing`` setting: True/"full", False/None/"none", "selective"."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in MODES:
        raise ValueError(f"gradient_checkpointing must be one of {', '.join(MODES)} (or a bool), got {value!r}")
    return value


def run_block(block: Callable[..., Any], mode: bool | str | None, *args: Any) -> Any:
    """``block(*args)`` with the activation checkpointing of ``mode`` when gradients are being recorded."""
    mode = checkpoint_mode(mode)
    if mode == "none" or not torch.is_grad_enabled():
        return block(*args)
    if mode == "full":
        return checkpoint(block, *args, use_reentrant=False)
    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))
