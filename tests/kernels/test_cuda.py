"""The compiled Triton kernels on a CUDA device (skipped without one): DiT-XL/2 shapes and odd ones, every dtype and the
autocast mixes (fp32 stream, bf16/fp16 modulation), outputs and gradients against the reference and fp64, and
``torch.compile`` (inductor) tracing through the ops.

These are the GPU counterpart of the interpreter tests; ``benchmarks/gpu_check.sh`` selects them by the "cuda" name.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit_fast.kernels import (
    gated_residual,
    gated_residual_modulated_layer_norm,
    gated_residual_modulated_layer_norm_ref,
    gated_residual_ref,
    modulated_layer_norm,
    modulated_layer_norm_ref,
    patchify,
    unpatchify,
    unpatchify_ref,
)

from ._util import DTYPES, check_against_references, run_with_grads

# (stream dtype, modulation dtype): one dtype throughout, and autocast's fp32 stream with bf16/fp16 modulation.
MIXES = [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (B, T, D): DiT-XL/2 at 256 px, batch 1 with a non-power-of-two token count, an odd width.
SHAPES = [(4, 256, 1152), (1, 36, 1152), (3, 50, 100)]


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _leaves(B: int, T: int, D: int, dtype: torch.dtype, n_stream: int,
            mod_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x (and y when n_stream == 2), then the (B, 6D) adaLN output; x in ``dtype``, the rest in ``mod_dtype``."""
    mod_dtype = mod_dtype or dtype
    stream = [(torch.randn(B, T, D, device="cuda") + 0.5).to(dtype if i == 0 else mod_dtype) for i in range(n_stream)]
    return [*stream, (torch.randn(B, 6 * D, device="cuda") * 0.5).to(mod_dtype)]


@pytest.mark.parametrize(("dtype", "mod_dtype"), MIXES, ids=str)
@pytest.mark.parametrize(("B", "T", "D"), SHAPES)
def test_cuda_modulated_layer_norm(B, T, D, dtype, mod_dtype):
    check_against_references(modulated_layer_norm, modulated_layer_norm_ref, _leaves(B, T, D, dtype, 1, mod_dtype),
                             lambda x, m: (x, *m.chunk(6, dim=1)[:2]), f"cuda modulated_layer_norm {dtype}/{mod_dtype}")


@pytest.mark.parametrize(("dtype", "mod_dtype"), MIXES, ids=str)
@pytest.mark.parametrize(("B", "T", "D"), SHAPES)
def test_cuda_gated_residual(B, T, D, dtype, mod_dtype):
    check_against_references(gated_residual, gated_residual_ref, _leaves(B, T, D, dtype, 2, mod_dtype),
                             lambda x, y, m: (x, m.chunk(6, dim=1)[2], y), f"cuda gated_residual {dtype}/{mod_dtype}")


@pytest.mark.parametrize(("dtype", "mod_dtype"), MIXES, ids=str)
@pytest.mark.parametrize(("B", "T", "D"), SHAPES)
def test_cuda_fused_block_boundary(B, T, D, dtype, mod_dtype):
    def build(x, y, m):
        _, _, gate, shift, scale, _ = m.chunk(6, dim=1)
        return x, gate, y, shift, scale

    check_against_references(gated_residual_modulated_layer_norm, gated_residual_modulated_layer_norm_ref,
                             _leaves(B, T, D, dtype, 2, mod_dtype), build,
                             f"cuda fused block boundary {dtype}/{mod_dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("B", "C", "H", "W", "p"), [(8, 4, 32, 32, 2), (1, 4, 64, 64, 8), (2, 3, 6, 10, 2)])
def test_cuda_patchify_unpatchify_exact(B, C, H, W, p, dtype):
    x = torch.randn(B, C, H, W, device="cuda").to(dtype)
    grad = torch.randn(B, (H // p) * (W // p), C * p * p, dtype=torch.float64)
    (out,), (dx,) = run_with_grads(lambda a: patchify(a, p), [x], lambda a: (a,), [grad])
    (ref,), (ref_dx,) = run_with_grads(lambda a: F.unfold(a, p, stride=p).transpose(1, 2), [x], lambda a: (a,), [grad])
    assert torch.equal(out, ref) and torch.equal(dx, ref_dx)
    tokens = torch.randn(B, (H // p) * (W // p), p * p * 2 * C, device="cuda").to(dtype)
    grid = (H // p, W // p)
    assert torch.equal(unpatchify(tokens, p, 2 * C, grid), unpatchify_ref(tokens, p, 2 * C, grid))


def test_cuda_backward_is_deterministic():
    leaves = _leaves(8, 256, 1152, torch.bfloat16, 2)

    def grads() -> list[torch.Tensor]:
        x, y, m = (t.detach().clone().requires_grad_() for t in leaves)
        _, _, gate, shift, scale, _ = m.chunk(6, dim=1)
        r, out = gated_residual_modulated_layer_norm(x, gate, y, shift, scale)
        torch.autograd.backward([r, out], [torch.ones_like(r), torch.full_like(out, 0.5)])
        return [x.grad, y.grad, m.grad]

    for a, b in zip(grads(), grads(), strict=True):
        assert torch.equal(a, b)


def test_cuda_torch_compile_inductor_traces_the_ops():
    """A block boundary + patch round trip under inductor, fullgraph: no graph break, same values and grads."""

    def step(img, x, y, m):
        _, _, gate, shift, scale, _ = m.chunk(6, dim=1)
        r, h = gated_residual_modulated_layer_norm(x, gate, y, shift, scale)
        h = modulated_layer_norm(h, shift, scale) + gated_residual(r, gate, y)
        tokens = patchify(img, 2)  # (B, 256, 16)
        return h.sum() + unpatchify(tokens, 2, 4).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    inputs = [torch.randn(2, 4, 32, 32, device="cuda"), *_leaves(2, 256, 1152, torch.float32, 2)]
    eager_in = [t.clone().requires_grad_() for t in inputs]
    comp_in = [t.clone().requires_grad_() for t in inputs]
    step(*eager_in).backward()
    compiled(*comp_in).backward()
    for a, b in zip(eager_in, comp_in, strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)
