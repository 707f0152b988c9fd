"""Datasheet numbers of the GPUs we measure on: dense peak FLOP/s per dtype and memory bandwidth.

One table, read by training's MFU log line (``dit_fast.training.trainer``), the benchmark suite
(``benchmarks/common.py``) and roofline tools: ``gpu_spec("NVIDIA H200")`` -> ``GPUSpec``; ``peak_flops(device,
torch.bfloat16)`` -> FLOP/s, or None on a CPU or an unlisted GPU. Peaks are dense (no 2:4 sparsity): NVIDIA's datasheets
print the sparse figure for tensor-core dtypes, which is twice the dense one.

``inference_dtype(device)`` decides what ``--dtype auto`` samples in: bf16 where the device has native bf16 GEMMs
(CUDA sm_80+; CPUs with AVX512-BF16 or AMX), fp32 elsewhere, with the reason. ``DTYPES``: the dtype names the
command line and the benchmarks use.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model's datasheet figures.

    ``peak_tflops``: dense peak TFLOP/s (1e12 FLOP/s, a multiply-add counted as 2) per dtype: bf16/fp16 on tensor
    cores, fp32 on the CUDA cores (plain FP32, not TF32), fp64 on tensor cores (data-center parts only).
    ``bandwidth_gbs``: HBM/GDDR bandwidth in GB/s (1e9 bytes/s). ``tf32_tflops``: dense TF32 tensor-core peak, what
    fp32 matmuls reach with ``torch.backends.cuda.matmul.allow_tf32``.
    """

    name: str
    peak_tflops: dict[torch.dtype, float]
    bandwidth_gbs: float
    tf32_tflops: float | None = field(default=None)


def _spec(name: str, bf16: float, fp32: float, fp64: float | None, tf32: float, bandwidth_gbs: float) -> GPUSpec:
    peaks = {torch.bfloat16: bf16, torch.float16: bf16, torch.float32: fp32}
    if fp64 is not None:
        peaks[torch.float64] = fp64
    return GPUSpec(name, peaks, bandwidth_gbs, tf32)


# Sources: NVIDIA's datasheets, dense figures (the printed tensor-core figures with sparsity halved):
# A100: "NVIDIA A100 Tensor Core GPU" datasheet (2021): BF16/FP16 312, TF32 156, FP32 19.5, FP64 tensor 19.5 TFLOPS;
#   80GB SXM4 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB SXM4 1,555 GB/s.
# H100: "NVIDIA H100 Tensor Core GPU" datasheet: SXM5 BF16/FP16 989.4, TF32 494.7, FP32 66.9, FP64 tensor 66.9 TFLOPS,
#   3.35 TB/s; PCIe 756.5 / 378 / 51.2 / 51.2 TFLOPS, 2.0 TB/s.
# H200: "NVIDIA H200 Tensor Core GPU" datasheet: SXM the H100 SXM5's compute (989.4 / 494.7 / 66.9 / 66.9) with
#   4.8 TB/s; NVL 835.5 / 417.5 / 60 / 60 TFLOPS, 4.8 TB/s.
# L40S, A10, RTX 4090: the NVIDIA L40S and A10 datasheets and the Ada architecture whitepaper (BF16 with FP32
#   accumulate); no FP64 figure is listed for them.
GPUS: dict[str, GPUSpec] = {s.name: s for s in (
    _spec("A100-SXM4-40GB", 312.0, 19.5, 19.5, 156.0, 1555.0),
    _spec("A100-SXM4-80GB", 312.0, 19.5, 19.5, 156.0, 2039.0),
    _spec("A100-PCIe-80GB", 312.0, 19.5, 19.5, 156.0, 1935.0),
    _spec("H100-SXM5-80GB", 989.4, 66.9, 66.9, 494.7, 3350.0),
    _spec("H100-PCIe-80GB", 756.5, 51.2, 51.2, 378.0, 2000.0),
    _spec("H200-SXM-141GB", 989.4, 66.9, 66.9, 494.7, 4800.0),
    _spec("H200-NVL-141GB", 835.5, 60.0, 60.0, 417.5, 4800.0),
    _spec("L40S", 362.05, 91.6, None, 183.0, 864.0),
    _spec("A10", 125.0, 31.2, None, 62.5, 600.0),
    _spec("RTX-4090", 165.2, 82.6, None, 82.6, 1008.0),
)}

# ``torch.cuda.get_device_name()`` fragments -> table entry, most specific first (matched case-insensitively).
_DEVICE_NAMES: tuple[tuple[str, str], ...] = (
    ("H200 NVL", "H200-NVL-141GB"),
    ("H200", "H200-SXM-141GB"),
    ("H100 PCIE", "H100-PCIe-80GB"),
    ("H100 NVL", ""),  # a different part (two boards, other clocks): not listed
    ("H100", "H100-SXM5-80GB"),
    ("A100-SXM4-40GB", "A100-SXM4-40GB"),
    ("A100-SXM4-80GB", "A100-SXM4-80GB"),
    ("A100 80GB PCIE", "A100-PCIe-80GB"),
    ("L40S", "L40S"),
    ("A10", "A10"),  # after every A100 entry
    ("RTX 4090", "RTX-4090"),
)


def gpu_spec(name_or_device: str | torch.device | int) -> GPUSpec | None:
    """The datasheet entry of a GPU, or None (a CPU device, an unlisted GPU).

    Takes a ``torch.cuda.get_device_name()`` string ("NVIDIA H200", "NVIDIA H100 80GB HBM3", ...), a table name
    ("H200-SXM-141GB"), a CUDA ``torch.device`` or a CUDA device index.
    """
    if isinstance(name_or_device, (torch.device, int)):
        device = torch.device("cuda", name_or_device) if isinstance(name_or_device, int) else name_or_device
        if device.type != "cuda":
            return None
        name_or_device = torch.cuda.get_device_name(device)
    if name_or_device in GPUS:
        return GPUS[name_or_device]
    upper = name_or_device.upper()
    for fragment, key in _DEVICE_NAMES:
        if fragment in upper:
            return GPUS.get(key)
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype, tf32: bool | None = None) -> float | None:
    """Dense peak FLOP/s of ``device`` for matmuls in ``dtype``; None on a CPU or an unlisted GPU.

    For fp32, the TF32 tensor-core peak when ``tf32`` (default: ``torch.backends.cuda.matmul.allow_tf32``), else the
    plain FP32 peak.
    """
    spec = gpu_spec(torch.device(device))
    if spec is None:
        return None
    if dtype == torch.float32 and (torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32):
        return None if spec.tf32_tflops is None else spec.tf32_tflops * 1e12
    tflops = spec.peak_tflops.get(dtype)
    return None if tflops is None else tflops * 1e12


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); empty where that file is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 GEMMs natively (faster than fp32), and why: (answer, reason)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return True, f"{name} (sm_{major}{minor}) has bf16 tensor cores"
        return False, f"{name} (sm_{major}{minor}) has no bf16 tensor cores (they start at sm_80)"
    if device.type != "cpu":
        return False, f"no bf16 rule for {device.type} devices"
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if native:
        return True, f"the CPU has {' and '.join(native)} (bf16 GEMM instructions)"
    return False, (f"the CPU has no AVX512-BF16 or AMX (PyTorch's vector ISA: "
                   f"{torch.backends.cpu.get_cpu_capability()}): its bf16 GEMMs are slower than fp32")


def inference_dtype(device: torch.device | str, requested: str = "auto") -> tuple[torch.dtype, str]:
    """The dtype to sample in for ``requested`` ("auto", "fp32" or "bf16") on ``device``, and why.

    "auto": bf16 where ``native_bf16``, else fp32. fp32 is what reproduces published numbers bit for bit.
    """
    if requested == "fp32":
        return torch.float32, "fp32 requested"
    if requested == "bf16":
        return torch.bfloat16, "bf16 requested"
    if requested != "auto":
        raise ValueError(f"dtype {requested!r}: choose auto, fp32 or bf16")
    native, why = native_bf16(device)
    return (torch.bfloat16 if native else torch.float32), f"auto: {'bf16' if native else 'fp32'}, {why}"


@contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS matmuls and cuDNN convolutions (the reference's patch embedding) inside the block, restored
    after it: fp32 means fp32 while computing an fp32 oracle."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
