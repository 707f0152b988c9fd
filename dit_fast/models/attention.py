"""Attention backends for DiT in one registry (the shape of diffusers' ``attention_dispatch``).

Every backend takes the fused qkv projection viewed as ``(N, T, 3, H, hd)`` (no copy: a reshape of the
``attn.qkv`` linear output) and returns ``(N, T, H, hd)``, so the output projection reads it with a free reshape.

Backends:
- ``flash_attn``: the flash-attn package (``flash_attn_qkvpacked_func``), CUDA, fp16/bf16, head dim <= 256.
- ``xformers``: ``xformers.ops.memory_efficient_attention``, CUDA.
- ``sdpa``: ``F.scaled_dot_product_attention``; PyTorch picks its kernel (cuDNN / flash / memory-efficient on
  CUDA, the flash CPU kernel on CPU). ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient`` and ``sdpa_math`` force one
  of PyTorch's kernels with ``torch.nn.attention.sdpa_kernel``.
- ``math``: explicit ``softmax(q k^T / sqrt(hd)) v`` in fp32, the oracle.

``"auto"`` picks the fastest backend available for the device, dtype and head dim: flash_attn for fp16/bf16 CUDA
tensors when installed, else sdpa. The default name comes from ``DIT_FAST_ATTENTION`` (else "auto"). A backend
named explicitly that is missing or cannot take the inputs raises (with the install hint); one chosen automatically
or through the environment variable falls back to sdpa with one warning. Optional packages are probed once, lazily,
with ``importlib.util.find_spec`` and a guarded import; importing this module imports neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ENV_VAR = "DIT_FAST_ATTENTION"
AttentionFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation and the inputs it accepts.

    ``fn`` maps qkv (N, T, 3, H, hd) to (N, T, H, hd). ``package`` is the optional module it needs (probed lazily),
    ``pip_name`` its distribution and ``extra`` the dit-fast extra that installs it. ``devices``, ``dtypes``,
    ``max_head_dim`` and ``head_dim_multiple`` bound the inputs (``None``: any); ``cuda_dtypes`` further restricts
    the dtypes on CUDA.
    """

    name: str
    fn: AttentionFn
    description: str
    package: str | None = None
    pip_name: str | None = None
    extra: str | None = None
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    cuda_dtypes: tuple[torch.dtype, ...] | None = None
    max_head_dim: int | None = None
    head_dim_multiple: int = 1

    def install_hint(self) -> str:
        return f"`pip install dit-fast[{self.extra}]` (or `pip install {self.pip_name}`)" if self.package else ""

    def unsupported_reason(self, device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this backend cannot run (N, T, 3, H, head_dim) qkv of ``dtype`` on ``device_type``; None if it can."""
        if self.package is not None and _import_optional(self.package) is None:
            return f"the {self.package} package is not installed; install it with {self.install_hint()}"
        if self.devices is not None and device_type not in self.devices:
            return f"it runs on {'/'.join(self.devices)} tensors, got {device_type}"
        for allowed, where in ((self.dtypes, ""), (self.cuda_dtypes if device_type == "cuda" else None, " on cuda")):
            if allowed is not None and dtype not in allowed:
                names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
                return f"it supports {names}{where}, got {str(dtype).removeprefix('torch.')}"
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"it supports head dim <= {self.max_head_dim}, got {head_dim}"
        if head_dim % self.head_dim_multiple:
            return f"it needs a head dim that is a multiple of {self.head_dim_multiple}, got {head_dim}"
        if self.name == "sdpa_cudnn" and not torch.backends.cudnn.is_available():
            return "cuDNN is not available in this PyTorch build"
        return None


# ---------------------------------------------------------------------------------------------------------------------
# optional packages: probed once, lazily

_OPTIONAL: dict[str, ModuleType | None] = {}


def _import_optional(package: str) -> ModuleType | None:
    """The imported package, or None where it is absent or fails to import (probed once per process)."""
    if package not in _OPTIONAL:
        module = None
        if importlib.util.find_spec(package) is not None:
            try:
                module = importlib.import_module(package)
            except Exception as e:  # a broken install (ABI mismatch, missing CUDA libs) counts as absent
                warnings.warn(f"dit_fast.models.attention: {package} is installed but failed to import ({e}); "
                              "treating it as absent", stacklevel=3)
        _OPTIONAL[package] = module
    return _OPTIONAL[package]


# ---------------------------------------------------------------------------------------------------------------------
# the backends: qkv (N, T, 3, H, hd) -> (N, T, H, hd)


def _split_heads_first(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (N, T, 3, H, hd) -> q, k, v as (N, H, T, hd) strided views (no copy)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def math_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Explicit ``softmax(q k^T / sqrt(hd)) v`` computed in fp32 (the oracle): (N, T, 3, H, hd) -> (N, T, H, hd)."""
    q, k, v = (u.float() for u in _split_heads_first(qkv))  # (N, H, T, hd) each
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (N, H, T, T)
    out = scores.softmax(dim=-1) @ v  # (N, H, T, hd)
    return out.transpose(1, 2).to(qkv.dtype)  # (N, T, H, hd)


def sdpa_attention(qkv: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with PyTorch's own kernel choice: (N, T, 3, H, hd) -> (N, T, H, hd)."""
    q, k, v = _split_heads_first(qkv)  # (N, H, T, hd) each
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (N, T, H, hd)


def _forced_sdpa(kernel_name: str) -> AttentionFn:
    def forced(qkv: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, kernel_name)):
            return sdpa_attention(qkv)

    forced.__name__ = f"sdpa_{kernel_name.lower()}_attention"
    forced.__doc__ = f"SDPA restricted to PyTorch's {kernel_name} kernel: (N, T, 3, H, hd) -> (N, T, H, hd)."
    return forced


def flash_attn_attention(qkv: torch.Tensor) -> torch.Tensor:
    """flash-attn's packed-qkv kernel, which reads the (N, T, 3, H, hd) layout as is -> (N, T, H, hd)."""
    flash_attn = _import_optional("flash_attn")
    return flash_attn.flash_attn_qkvpacked_func(qkv)


def xformers_attention(qkv: torch.Tensor) -> torch.Tensor:
    """xformers' memory-efficient attention on (N, T, H, hd) views of the qkv: -> (N, T, H, hd)."""
    _import_optional("xformers")
    import xformers.ops

    q, k, v = qkv.unbind(2)  # (N, T, H, hd) each
    return xformers.ops.memory_efficient_attention(q, k, v)


_HALF = (torch.float16, torch.bfloat16)
BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        AttentionBackend("flash_attn", flash_attn_attention, "flash-attn 2 packed-qkv kernel", package="flash_attn",
                         pip_name="flash-attn", extra="flash", devices=("cuda",), dtypes=_HALF, max_head_dim=256,
                         head_dim_multiple=8),
        AttentionBackend("xformers", xformers_attention, "xformers memory_efficient_attention", package="xformers",
                         pip_name="xformers", extra="xformers", devices=("cuda",)),
        AttentionBackend("sdpa", sdpa_attention, "F.scaled_dot_product_attention, PyTorch picks the kernel"),
        AttentionBackend("sdpa_flash", _forced_sdpa("FLASH_ATTENTION"), "SDPA forced to its flash kernel",
                         cuda_dtypes=_HALF, max_head_dim=256),
        AttentionBackend("sdpa_cudnn", _forced_sdpa("CUDNN_ATTENTION"), "SDPA forced to its cuDNN kernel",
                         devices=("cuda",), dtypes=_HALF),
        AttentionBackend("sdpa_efficient", _forced_sdpa("EFFICIENT_ATTENTION"),
                         "SDPA forced to its memory-efficient kernel", devices=("cuda",)),
        AttentionBackend("sdpa_math", _forced_sdpa("MATH"), "SDPA forced to its math kernel"),
        AttentionBackend("math", math_attention, "explicit softmax in fp32 (the oracle)"),
    )
}
_warned: set[tuple[str, str]] = set()


def default_backend() -> str:
    """The backend name used for ``attention="auto"`` models: ``$DIT_FAST_ATTENTION`` or "auto"."""
    return os.environ.get(ENV_VAR, "").strip() or "auto"


def check_environment() -> None:
    """ValueError naming ``$DIT_FAST_ATTENTION`` when it holds no registered backend's name; the commands call it
    before any work (a registered backend that cannot run here falls back with a warning instead)."""
    name = default_backend()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"environment variable {ENV_VAR}={name!r} is not an attention backend; valid names: auto, "
                         f"{', '.join(BACKENDS)}")


def check_backend_name(name: str) -> str:
    """``name`` itself if it is "auto" or a registered backend, else a ValueError listing the valid names."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid names: auto, {', '.join(BACKENDS)}")
    return name


def require_backend(name: str) -> str:
    """``name`` if it is "auto" or a registered backend whose package is installed; else ValueError / ImportError.

    What model constructors call, so that a missing optional package fails at construction with the install hint.
    """
    backend = BACKENDS.get(check_backend_name(name))
    if backend is not None and backend.package is not None and _import_optional(backend.package) is None:
        raise ImportError(f"attention backend {name!r} needs the {backend.package} package, which is not installed; "
                          f"install it with {backend.install_hint()}")
    return name


def _auto_choice(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    if BACKENDS["flash_attn"].unsupported_reason(device_type, dtype, head_dim) is None:
        return "flash_attn"
    return "sdpa"


def _warn_once(key: tuple[str, str], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


@torch.compiler.assume_constant_result
def resolve_backend(name: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The registered backend that runs attention for ``name`` ("auto", a backend name, or "" for the default).

    Explicit names must be installed and support (device_type, dtype, head_dim), else ImportError / ValueError with
    the reason. "auto" picks flash_attn for fp16/bf16 CUDA where installed, else sdpa; a name taken from
    ``$DIT_FAST_ATTENTION`` that cannot run falls back to that choice with one warning. Constant for the compiler
    (the inputs are Python values, the packages are probed once).
    """
    from_env = name in ("", "auto") and default_backend() != "auto"
    requested = check_backend_name(default_backend() if name in ("", "auto") else name)
    auto = _auto_choice(device_type, dtype, head_dim)
    if requested == "auto":
        if auto != "flash_attn" and device_type == "cuda" and dtype in _HALF and head_dim <= 256:
            _warn_once(("auto", "flash_attn"), "dit_fast.models.attention: flash-attn is not installed, "
                       f"attention='auto' uses sdpa (PyTorch's kernels); install "
                       f"{BACKENDS['flash_attn'].install_hint()} for flash-attn")
        return auto
    reason = BACKENDS[requested].unsupported_reason(device_type, dtype, head_dim)
    if reason is None:
        return requested
    if from_env:
        _warn_once((requested, auto), f"dit_fast.models.attention: {ENV_VAR}={requested} cannot run here ({reason}); "
                   f"falling back to {auto}")
        return auto
    error = ImportError if BACKENDS[requested].package and "not installed" in reason else ValueError
    raise error(f"attention backend {requested!r} cannot run {device_type} {str(dtype).removeprefix('torch.')} "
                f"attention with head dim {head_dim}: {reason}")


def attention(qkv: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Multi-head self-attention (no mask, scale 1/sqrt(hd)) on a fused qkv projection.

    Args:
        qkv: (N, T, 3, H, hd), e.g. ``qkv_linear(x).unflatten(-1, (3, H, hd))``; the last dim must have unit stride.
        backend: "auto", a name in ``BACKENDS``, or "" for ``$DIT_FAST_ATTENTION``.

    Returns:
        (N, T, H, hd) in qkv's dtype (reshape to (N, T, H * hd) for the output projection).
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (N, T, 3, H, hd), got {tuple(qkv.shape)}")
    name = resolve_backend(backend, qkv.device.type, qkv.dtype, qkv.shape[-1])
    return BACKENDS[name].fn(qkv)


def available_backends(device_type: str, dtype: torch.dtype, head_dim: int) -> dict[str, str | None]:
    """Every registered backend -> None if it can run such inputs here, else the reason it cannot."""
    return {name: b.unsupported_reason(device_type, dtype, head_dim) for name, b in BACKENDS.items()}
