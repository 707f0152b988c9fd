"""linear_gelu: fc1 + bias + tanh-GELU, the GEMM epilogue on CUDA (those tests skip without a GPU); the custom op and
its recomputing backward are checked on the CPU too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit_fast.kernels import linear_gelu, linear_gelu_ref

from ._util import DTYPES, check_against_references

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_leaves(M: int, K: int, N: int, dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    """x (2, M, K) and fc1's weight (N, K), bias (N,), scaled so the pre-activation spans GELU's curved range."""
    x = torch.randn(2, M, K, device=device)
    weight = torch.randn(N, K, device=device) * K**-0.5 * 2
    bias = torch.randn(N, device=device) * 0.5
    return [t.to(dtype) for t in (x, weight, bias)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("M", "K", "N"), [(7, 24, 40), (5, 37, 148)])
def test_custom_op_and_backward_match_reference(M, K, N, dtype):
    """The registered op (CPU path: addmm + tanh-GELU) and its backward (recomputed pre-activation, gelu_backward,
    the linear's GEMMs) against F.linear + F.gelu(tanh), and fp64."""
    check_against_references(torch.ops.dit_fast.linear_gelu, linear_gelu_ref, make_leaves(M, K, N, dtype),
                             lambda *a: a, f"linear_gelu op {dtype}")


def test_cpu_dispatch_runs_the_reference():
    x, w, b = make_leaves(3, 16, 32, torch.float32)
    assert torch.equal(linear_gelu(x, w, b), linear_gelu_ref(x, w, b))


def test_addmm_activation_on_cpu_is_the_erf_gelu():
    """Why the CPU never runs torch._addmm_activation: there its GELU is the exact erf form, not DiT's tanh form."""
    x, w, b = make_leaves(4, 32, 48, torch.float64)
    out = torch._addmm_activation(b, x[0], w.t(), use_gelu=True)
    pre = torch.addmm(b, x[0], w.t())
    torch.testing.assert_close(out, F.gelu(pre), rtol=1e-12, atol=1e-12)
    assert (out - F.gelu(pre, approximate="tanh")).abs().max() > 1e-5


def test_torch_compile_fullgraph_traces_the_op():
    leaves = [t.requires_grad_() for t in make_leaves(3, 16, 32, torch.float32)]
    torch._dynamo.reset()
    compiled = torch.compile(torch.ops.dit_fast.linear_gelu, fullgraph=True, backend="eager")
    out = compiled(*leaves)
    torch.testing.assert_close(out, linear_gelu_ref(*leaves), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize(("x", "w", "b", "error", "match"), [
    (torch.randn(2, 3, 8), torch.randn(16, 9), torch.randn(16), ValueError, "x's last dim must be K = 9"),
    (torch.randn(2, 3, 8), torch.randn(16, 8), torch.randn(15), ValueError, r"bias \(N,\)"),
    (torch.randn(2, 3, 8), torch.randn(16, 8), None, TypeError, "bias must be a torch.Tensor"),
])
def test_bad_inputs_raise(x, w, b, error, match):
    with pytest.raises(error, match=match):
        linear_gelu(x, w, b)


@cuda
def test_cuda_epilogue_gelu_is_the_tanh_form():
    """cuBLASLt's GELU epilogue (through _addmm_activation) matches tanh-GELU to fp32 rounding, not the erf form."""
    x, w, b = make_leaves(64, 256, 512, torch.float32, "cuda")
    out = torch._addmm_activation(b, x[0], w.t(), use_gelu=True)
    pre = torch.addmm(b, x[0], w.t())
    tanh_err = (out - F.gelu(pre, approximate="tanh")).abs().max().item()
    erf_err = (out - F.gelu(pre)).abs().max().item()
    assert tanh_err < 1e-4 < erf_err, (tanh_err, erf_err)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("M", "K", "N"), [(256, 1152, 4608), (37, 100, 400)])
def test_cuda_matches_reference(M, K, N, dtype):
    check_against_references(linear_gelu, linear_gelu_ref, make_leaves(M, K, N, dtype, "cuda"), lambda *a: a,
                             f"cuda linear_gelu {dtype}")


@cuda
def test_cuda_under_autocast():
    """fp32 parameters, bf16 autocast: the operands are cast as F.linear's would be; bf16 result, fp32 grads."""
    x, w, b = (t.requires_grad_() for t in make_leaves(256, 384, 1536, torch.float32, "cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = linear_gelu(x, w, b)
        ref = linear_gelu_ref(x, w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
