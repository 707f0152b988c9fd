"""The kernel sets a DiTFast forward can use, in one registry (the shape of ``dit_fast.models.attention``'s).

A kernel set is the five fused ops a forward calls (``KernelOps``):
- ``triton``: the public ops of this package: Triton row kernels on CUDA (on the CPU their plain-PyTorch reference,
  or the Triton interpreter under ``TRITON_INTERPRET=1``) and ``linear`` with its per-device GEMM epilogue routes
  (cuBLASLt on CUDA, oneDNN on the CPU).
- ``onednn``: the CPU's fast set, no Triton needed: the row ops' plain-PyTorch twins (which ``torch.compile`` fuses)
  and ``linear``'s oneDNN routes (bias and GELU in the GEMM epilogue; bf16 widened to fp32 where the CPU has no
  bf16 GEMM).
- ``torch``: the plain-PyTorch ``<op>_ref`` twins on any device (``F.linear`` + ``F.gelu`` for the linears), which
  ``torch.compile`` (inductor) fuses itself.

``"auto"`` picks ``triton`` on CUDA with Triton installed, ``onednn`` on a CPU with oneDNN, else ``torch``. The
default name comes from ``DIT_FAST_KERNELS`` (else "auto"). A set named explicitly that cannot run raises (with the
install hint); one taken from the environment variable that cannot run falls back to the automatic choice with one
warning.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._common import interpret_enabled
from .gated_residual_modulated_layer_norm import (
    gated_residual_modulated_layer_norm,
    gated_residual_modulated_layer_norm_ref,
)
from .linear import linear, linear_ref, onednn_supports
from .modulated_layer_norm import modulated_layer_norm, modulated_layer_norm_ref
from .patchify import patchify, patchify_ref
from .unpatchify import unpatchify, unpatchify_ref

ENV_VAR = "DIT_FAST_KERNELS"


@dataclass(frozen=True)
class KernelOps:
    """The fused ops a DiTFast forward calls (signatures of ``dit_fast.kernels``)."""

    modulated_layer_norm: Callable[..., torch.Tensor]
    gated_residual_modulated_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    patchify: Callable[..., torch.Tensor]
    unpatchify: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]


KERNELS: dict[str, KernelOps] = {
    "triton": KernelOps(modulated_layer_norm, gated_residual_modulated_layer_norm, patchify, unpatchify, linear),
    "onednn": KernelOps(modulated_layer_norm_ref, gated_residual_modulated_layer_norm_ref, patchify_ref,
                        unpatchify_ref, linear),
    "torch": KernelOps(modulated_layer_norm_ref, gated_residual_modulated_layer_norm_ref, patchify_ref,
                       unpatchify_ref, linear_ref),
}
_warned: set[str] = set()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_kernels() -> str:
    """The kernel-set name used for ``kernels="auto"`` models: ``$DIT_FAST_KERNELS`` or "auto"."""
    return os.environ.get(ENV_VAR, "").strip() or "auto"


def check_environment() -> None:
    """ValueError naming ``$DIT_FAST_KERNELS`` when it holds no registered kernel set's name; the commands call it
    before any work."""
    name = default_kernels()
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"environment variable {ENV_VAR}={name!r} is not a kernel set; valid names: auto, "
                         f"{', '.join(KERNELS)}")


def check_kernels_name(name: str) -> str:
    """``name`` itself if it is "auto" or a registered kernel set, else a ValueError listing the valid names."""
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"unknown kernels {name!r}; valid names: auto, {', '.join(KERNELS)}")
    return name


def unsupported_reason(name: str) -> str | None:
    """Why kernel set ``name`` cannot run here; None if it can."""
    if name == "triton" and not _triton_installed():
        return ("the triton package is not installed; install it with `pip install dit-fast[triton]` (or `pip "
                "install triton`)")
    if name == "onednn" and not onednn_supports(torch.float32):
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn) linear"
    return None


def require_kernels(name: str) -> str:
    """``name`` if it is "auto", "torch", or a set that can run here; else ValueError / ImportError.

    What model constructors call, so that a missing Triton fails at construction with the install hint.
    """
    check_kernels_name(name)
    if name != "auto" and (reason := unsupported_reason(name)) is not None:
        raise ImportError(f"kernels={name!r} cannot run: {reason}, or use kernels='torch'")
    return name


def _auto_choice(device_type: str) -> str:
    if device_type == "cuda" and _triton_installed():
        return "triton"
    return "onednn" if device_type == "cpu" and unsupported_reason("onednn") is None else "torch"


@torch.compiler.assume_constant_result
def resolve_kernels(name: str, device_type: str) -> str:
    """The kernel set a forward on ``device_type`` uses for the requested ``name``.

    "auto" takes ``$DIT_FAST_KERNELS`` when set (falling back, with one warning, where it cannot run), else "triton"
    on CUDA with Triton installed, "onednn" on a CPU with oneDNN and "torch" otherwise. Constant for the compiler.
    "triton" on CPU tensors runs the row ops' PyTorch twins (the Triton interpreter under ``TRITON_INTERPRET=1``);
    it says so once.
    """
    if name != "auto":
        if name == "triton" and device_type != "cuda" and not interpret_enabled() and "triton-cpu" not in _warned:
            _warned.add("triton-cpu")
            warnings.warn(f"kernels='triton' on {device_type} tensors runs the PyTorch twins of the fused ops (the "
                          "Triton kernels need CUDA; set TRITON_INTERPRET=1 to run them in the Triton interpreter)",
                          stacklevel=3)
        return name
    env = default_kernels()
    if env != "auto":
        if env in KERNELS and unsupported_reason(env) is None:
            return env
        if env not in _warned:
            _warned.add(env)
            warnings.warn(f"{ENV_VAR}={env} is not usable here (valid: auto, triton with triton installed, "
                          "onednn with oneDNN, torch); choosing kernels automatically", stacklevel=3)
    return _auto_choice(device_type)


def available_kernels() -> dict[str, str | None]:
    """Every registered kernel set -> None if it can run here, else the reason it cannot."""
    return {name: unsupported_reason(name) for name in KERNELS}
