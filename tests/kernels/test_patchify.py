"""patchify: the Triton gather/scatter kernels (in the interpreter) against F.unfold; values move bit-exactly."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from dit_fast.kernels import patchify, patchify_ref, unpatchify

from ._util import DTYPES, run_with_grads

op_module = importlib.import_module("dit_fast.kernels.patchify")

# (B, C, H, W, p): DiT's 4-channel latents, batch 1, a non-square image (grid 3 x 5), odd channel counts, p = 1.
SHAPES = [(2, 4, 8, 8, 2), (1, 4, 16, 16, 4), (2, 3, 6, 10, 2), (1, 5, 8, 8, 8), (2, 2, 3, 5, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("B", "C", "H", "W", "p"), SHAPES)
def test_equals_unfold_with_grads(B, C, H, W, p, dtype):
    x = torch.randn(B, C, H, W).to(dtype)
    grad = torch.randn(B, (H // p) * (W // p), C * p * p, dtype=torch.float64)
    (out,), (dx,) = run_with_grads(lambda a: patchify(a, p), [x], lambda a: (a,), [grad])
    (ref_out,), (ref_dx,) = run_with_grads(lambda a: F.unfold(a, p, stride=p).transpose(1, 2), [x], lambda a: (a,),
                                           [grad])
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, ref_out)
    assert torch.equal(dx, ref_dx)


def test_patch_vector_order_is_channel_row_column():
    """Token (gh, gw), element c * p * p + i * p + j is pixel (c, gh * p + i, gw * p + j)."""
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    out = patchify(x, 2)  # grid 2 x 3
    b, gh, gw, c, i, j = 1, 1, 2, 2, 1, 0
    assert out[b, gh * 3 + gw, c * 4 + i * 2 + j] == x[b, c, gh * 2 + i, gw * 2 + j]


def test_strided_image():
    """Channels-last memory and a sliced view are read in place."""
    base = torch.randn(2, 4, 8, 16)
    for x in (base.to(memory_format=torch.channels_last), base[..., ::2]):
        assert torch.equal(patchify(x, 2), patchify_ref(x, 2))


def test_round_trip_with_unpatchify():
    """patchify, reorder each vector (C, p, p) -> (p, p, C), unpatchify: the identity, on a non-square grid."""
    B, C, H, W, p = 2, 3, 6, 10, 2
    x = torch.randn(B, C, H, W)
    tokens = patchify(x, p).reshape(B, -1, C, p, p).permute(0, 1, 3, 4, 2).reshape(B, -1, p * p * C)
    assert torch.equal(unpatchify(tokens, p, C, grid=(H // p, W // p)), x)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def fail(*args):
        raise AssertionError("the Triton op ran for CPU tensors without TRITON_INTERPRET")

    monkeypatch.setattr(op_module, "_fwd_op", fail)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(patchify(x, 2), patchify_ref(x, 2))


@pytest.mark.parametrize(("x", "p", "error", "match"), [
    (torch.randn(4, 8, 8), 2, ValueError, "x must have 4 dims"),
    (torch.randn(1, 4, 8, 6), 4, ValueError, "not divisible by the patch size 4"),
    (torch.randn(1, 4, 8, 8), 0, ValueError, "patch size p must be a positive int"),
    (torch.randn(1, 4, 8, 8).long(), 2, TypeError, "x must be float32"),
])
def test_bad_inputs_raise(x, p, error, match):
    with pytest.raises(error, match=match):
        patchify(x, p)
