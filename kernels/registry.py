"""The kernel sets a DiTFast forward can use, in one registry (the shape of ``dit_fast.models.attention``'s).

A kernel set is the four fused ops a forward calls (``KernelOps``):
- ``triton``: the public ops of this package: Triton kernels on CUDA; on the CPU their plain-PyTorch reference (the
  Triton interpreter under ``TRITON_INTERPRET=1``).
- ``torch``: the plain-PyTorch ``<op>_ref`` twins on any device, which ``torch.compile`` (inductor) fuses itself.

``"auto"`` picks ``triton`` on CUDA with Triton installed, else ``torch``. The default name comes from
``DIT_FAST_KERNELS`` (else "auto"). A set named explicitly that cannot run raises (with the install hint); one taken
from the environment variable that cannot run falls back to the automatic choice with one warning.
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


KERNELS: dict[str, KernelOps] = {
    "triton": KernelOps(modulated_layer_norm, gated_residual_modulated_layer_norm, patchify, unpatchify),
    "torch": KernelOps(modulated_layer_norm_ref, gated_residual_modulated_layer_norm_ref, patchify_ref,
                       unpatchify_ref),
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
    return None


def require_kernels(name: str) -> str:
    """``name`` if it is "auto", "torch", or "triton" with Triton installed; else ValueError / ImportError.

    What model constructors call, so that a missing Triton fails at construction with the install hint.
    """
    check_kernels_name(name)
    if name != "auto" and (reason := unsupported_reason(name)) is not None:
        raise ImportError(f"kernels={name!r} cannot run: {reason}, or use kernels='torch'")
    return name


def _auto_choice(device_type: str) -> str:
    return "triton" if device_type == "cuda" and _triton_installed() else "torch"


@torch.compiler.assume_constant_result
def resolve_kernels(name: str, device_type: str) -> str:
    """The kernel set ("triton" or "torch") a forward on ``device_type`` uses for the requested ``name``.

    "auto" takes ``$DIT_FAST_KERNELS`` when set (falling back, with one warning, where it cannot run), else "triton"
    on CUDA with Triton installed and "torch" otherwise. Constant for the compiler. "triton" on CPU tensors runs the
    ops' PyTorch twins (the Triton interpreter under ``TRITON_INTERPRET=1``); it says so once.
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
                          "torch); choosing kernels automatically", stacklevel=3)
    return _auto_choice(device_type)


def available_kernels() -> dict[str, str | None]:
    """Every registered kernel set -> None if it can run here, else the reason it cannot."""
    return {name: unsupported_reason(name) for name in KERNELS}
