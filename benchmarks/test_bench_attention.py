"""Attention backends side by side at DiT's head dims: 64 (DiT-S, B, L) and 72 (DiT-XL).

Group "attention hd<hd>": every backend of ``dit_fast.models.attention.BACKENDS`` that can run here, on the same qkv
``(N, T, 3, H, hd)`` (the fused projection's layout, as DiTFast calls them). On a GPU: PyTorch's SDPA kernels forced
one at a time (``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``), SDPA with PyTorch's own pick (``sdpa``, what
the reference model runs), flash-attn and xformers when installed (skipped, with the reason, when not), at
N = 64, T = 256 (DiT at 256 px, patch 2), H = 16 in the run's dtype (bf16 by default). On a CPU only ``sdpa`` and the
fp32 ``math`` oracle run, at small shapes, so the suite runs anywhere. The backend ``"auto"`` picks is recorded.

Each round on CUDA is one ``triton.testing.do_bench`` (median of its repetitions) inside the benchmarked callable
(``extra_info["seconds"]`` is the per-call median); on a CPU pytest-benchmark's timer. ``gflop``: QK^T and AV,
``4 N H T^2 hd / 1e9``. ``max_rel_err`` against the ``math`` backend (softmax in fp32) on fp32 copies of the inputs,
held to the dtype's bound of ``benchmarks.common.parity_tolerance``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import BenchSettings, kernel_seconds, max_rel_err, parity_tolerance
from dit_fast.models import attention as A

HEAD_DIMS = (64, 72)
GPU_BACKENDS = ("sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn", "xformers")
CPU_BACKENDS = ("sdpa", "math")
# (N, T, H) per device kind
SHAPES = {"cuda": (64, 256, 16), "cpu": (2, 64, 2)}



@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda hd: f"hd{hd}")
@pytest.mark.parametrize("backend", (*GPU_BACKENDS, "math"))
def test_attention_backend(benchmark, bench_settings: BenchSettings, backend: str, head_dim: int) -> None:
    device, dtype = bench_settings.device, bench_settings.dtype
    kind = "cuda" if device.type == "cuda" else "cpu"
    if backend not in (GPU_BACKENDS if kind == "cuda" else CPU_BACKENDS):
        pytest.skip(f"{backend} is not compared on {kind}")
    reason = A.BACKENDS[backend].unsupported_reason(device.type, dtype, head_dim)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    n, t, h = SHAPES[kind]
    gen = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(n, t, 3, h, head_dim, generator=gen, device=device).to(dtype)
    fn = A.BACKENDS[backend].fn
    benchmark.group = f"attention hd{head_dim}"
    seconds = kernel_seconds(benchmark, lambda: fn(qkv), device, cpu_rounds=10)

    out = fn(qkv)
    oracle = A.math_attention(qkv.float())
    err = max_rel_err(out, oracle)
    tolerance = parity_tolerance(dtype)
    gflop = 4 * n * h * t * t * head_dim / 1e9
    info = {"impl": backend, "case": f"N={n} T={t} H={h} hd={head_dim} {bench_settings.dtype_name}",
            "gflop": gflop, "max_rel_err": err, "tolerance": tolerance, "parity_ok": err <= tolerance,
            "dtype": bench_settings.dtype_name, "device": str(device),
            "auto_choice": A.resolve_backend("auto", device.type, dtype, head_dim)}
    if seconds:
        info.update(seconds=seconds, gflops=gflop / seconds)
    benchmark.extra_info.update(info)
    assert out.shape == (n, t, h, head_dim)
    assert err <= tolerance, f"{backend} hd{head_dim}: max_rel_err {err:.3g} > {tolerance:.3g}"
