"""Print the installed compute backends and what ``attention="auto"`` / ``kernels="auto"`` pick on this machine.

``dit-fast env`` lists torch / triton versions and the device, every attention backend of the registry with the
reason it cannot run (if any) for fp32 and bf16 at the given head dim (72 = DiT-XL), PyTorch's SDPA kernels, the
fused-kernel set (with the CPU's GEMM route per dtype), the sampling dtype ``--dtype auto`` picks and why, and the
``DIT_FAST_ATTENTION`` / ``DIT_FAST_KERNELS`` defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import warnings

import torch

from dit_fast.commands.arguments import positive_int
from dit_fast.kernels.linear import cpu_linear_route
from dit_fast.kernels.registry import ENV_VAR as KERNELS_ENV_VAR
from dit_fast.kernels.registry import available_kernels, resolve_kernels
from dit_fast.models.attention import BACKENDS, ENV_VAR, available_backends, resolve_backend
from dit_fast.utils.hardware import inference_dtype

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _version(package: str) -> str:
    if importlib.util.find_spec(package) is None:
        return "not installed"
    try:
        return str(__import__(package).__version__)
    except Exception as e:  # a broken optional install is reported, not raised
        return f"installed but unimportable ({type(e).__name__}: {e})"


def _auto_choice(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            choice = resolve_backend("auto", device_type, dtype, head_dim)
        except (ImportError, ValueError) as e:
            return f"error: {e}"
    return choice + "".join(f"  (warning: {w.message})" for w in caught)


def report(device_type: str, head_dim: int) -> list[str]:
    """The lines ``dit-fast env`` prints for ``device_type`` ("cpu" or "cuda") and ``head_dim``."""
    lines = [f"torch {torch.__version__}, triton {_version('triton')}, flash-attn {_version('flash_attn')}, "
             f"xformers {_version('xformers')}"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"device: cuda ({torch.cuda.get_device_name()}, sm_{major}{minor}, CUDA {torch.version.cuda})")
    else:
        lines.append(f"device: cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); no CUDA device")
    lines.append(f"environment: {ENV_VAR}={os.environ.get(ENV_VAR, '') or '(unset)'}, "
                 f"{KERNELS_ENV_VAR}={os.environ.get(KERNELS_ENV_VAR, '') or '(unset)'}")
    lines.append("")
    lines.append(f"attention backends on {device_type}, head dim {head_dim}:")
    table = {name: available_backends(device_type, dtype, head_dim) for name, dtype in _DTYPES.items()}
    for backend in BACKENDS.values():
        reasons = {d: table[d][backend.name] for d in _DTYPES}
        if len(set(reasons.values())) == 1:  # the same answer for every dtype
            reason = next(iter(reasons.values()))
            status = "available" if reason is None else f"unavailable: {reason}"
        else:
            status = "; ".join(f"{d}: {'yes' if r is None else 'no, ' + r}" for d, r in reasons.items())
        lines.append(f"  {backend.name:<15} {status}  [{backend.description}]")
    for name, dtype in _DTYPES.items():
        lines.append(f"  auto picks for {name}: {_auto_choice(device_type, dtype, head_dim)}")
    if device_type == "cuda":
        sdpa = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
        lines.append("  sdpa CUDA kernels enabled: " + ", ".join(f"{k}={v}" for k, v in sdpa.items())
                     + f"; flash built: {torch.backends.cuda.is_flash_attention_available()}")
    else:
        lines.append("  sdpa on cpu: PyTorch's flash CPU kernel (fp32/bf16/fp16), math fallback")
    lines.append("")
    lines.append(f"fused kernels: auto picks {resolve_kernels('auto', device_type)!r} on {device_type} "
                 "(triton: Triton row kernels + cuBLASLt epilogues on CUDA; onednn: the CPU's oneDNN GEMM epilogues; "
                 "torch: plain PyTorch)")
    for name, reason in available_kernels().items():
        lines.append(f"  {name:<15} {'available' if reason is None else 'unavailable: ' + reason}")
    if device_type == "cpu":
        lines.append("  CPU linear routes: " + ", ".join(f"{n} -> {cpu_linear_route(d)}" for n, d in _DTYPES.items()))
    lines.append("")
    dtype, reason = inference_dtype(device_type, "auto")
    lines.append(f"sampling dtype (dit-fast sample --dtype auto): {str(dtype).removeprefix('torch.')}: {reason}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device to report on (default: cuda when available, else cpu)")
    parser.add_argument("--head-dim", type=positive_int, default=72,
                        help="attention head dim (72 = DiT-XL, 64 = DiT-S/B/L)")


def main(args: argparse.Namespace) -> int:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print("\n".join(report(device, args.head_dim)))
    return 0
