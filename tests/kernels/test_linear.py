"""linear: every linear of DiT on its per-device route (oneDNN on the CPU, fp32-widened bf16 where the CPU has no bf16
GEMM), against ``F.linear`` (+ tanh-GELU) in the same dtype and in fp64, outputs and gradients."""

from __future__ import annotations

import importlib

import pytest
import torch

from dit_fast.kernels import linear_ref

from ._util import DTYPES, check_against_references

L = importlib.import_module("dit_fast.kernels.linear")  # the module (the package exports the function as `linear`)


def make_leaves(M: int, K: int, N: int, dtype: torch.dtype, bias: bool = True) -> list[torch.Tensor]:
    """x (2, M, K), weight (N, K), bias (N,): random, scaled so the pre-activation spans GELU's curved range."""
    g = torch.Generator().manual_seed(M * K + N)
    leaves = [torch.randn(2, M, K, generator=g), torch.randn(N, K, generator=g) * K**-0.5 * 2]
    if bias:
        leaves.append(torch.randn(N, generator=g) * 0.5)
    return [t.to(dtype) for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("M", "K", "N", "bias"), [(7, 24, 40, True), (5, 37, 148, False)])
def test_linear_with_gradients_matches_reference(M, K, N, bias, dtype):
    """Training route (GELU after the GEMM): outputs and the gradients of x, weight and bias."""
    check_against_references(lambda x, w, b=None: L.linear(x, w, b, gelu=True),
                             lambda x, w, b=None: linear_ref(x, w, b, gelu=True),
                             make_leaves(M, K, N, dtype, bias), lambda *a: a, f"linear {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gelu", [False, True])
def test_inference_route_matches_reference(dtype, gelu):
    """Inference route (GELU in the epilogue): no further from fp64 than F.linear in the same dtype (x2 + one ulp)."""
    x, w, b = make_leaves(9, 1152 // 8, 193, dtype)
    with torch.no_grad():
        got, same = L.linear(x, w, b, gelu), linear_ref(x, w, b, gelu)
        exact = linear_ref(x.double(), w.double(), b.double(), gelu)
    assert got.dtype == dtype and got.shape == same.shape
    err, ref_err = (got.double() - exact).abs().max().item(), (same.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max().item() + 1e-6, (err, ref_err)


def test_cpu_routes_are_the_fastest_available():
    """fp32 on oneDNN; bf16 on oneDNN where it has a bf16 GEMM, else widened to fp32 (never F.linear's slow loop)."""
    if not L._ONEDNN:
        pytest.skip("PyTorch built without oneDNN")
    assert L.cpu_linear_route(torch.float32) == "onednn"
    expected = "onednn" if L.onednn_supports(torch.bfloat16) else "onednn-fp32"
    assert L.cpu_linear_route(torch.bfloat16) == expected
    assert L.cpu_linear_route(torch.float64) == "torch"


def test_autocast_and_mixed_dtypes_take_the_reference():
    x, w, b = make_leaves(3, 16, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.linear(x, w, b, True)
        assert out.dtype == torch.bfloat16
    torch.testing.assert_close(L.linear(x.double(), w.double()),
                               linear_ref(x.double(), w.double()), rtol=0, atol=0)
