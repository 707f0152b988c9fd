"""unpatchify: the Triton scatter/gather kernels (in the interpreter) against the official DiT.unpatchify."""

from __future__ import annotations

import importlib

import pytest
import torch

from dit_fast.kernels import unpatchify, unpatchify_ref

from ._util import DTYPES, run_with_grads

op_module = importlib.import_module("dit_fast.kernels.unpatchify")


def official_unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """``DiT.unpatchify`` of facebookresearch/DiT models.py (square grids), restated."""
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1]
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(shape=(x.shape[0], c, h * p, h * p))


# (B, T, p, c): DiT's learned-sigma output (8 channels) and plain (4), batch 1, odd channel counts, p = 1.
SHAPES = [(2, 16, 2, 8), (1, 4, 4, 4), (2, 9, 2, 3), (1, 4, 8, 5), (3, 25, 1, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("B", "T", "p", "c"), SHAPES)
def test_equals_official_unpatchify_with_grads(B, T, p, c, dtype):
    y = torch.randn(B, T, p * p * c).to(dtype)
    side = int(T**0.5)
    grad = torch.randn(B, c, side * p, side * p, dtype=torch.float64)
    (out,), (dy,) = run_with_grads(lambda a: unpatchify(a, p, c), [y], lambda a: (a,), [grad])
    (ref_out,), (ref_dy,) = run_with_grads(lambda a: official_unpatchify(a, p, c), [y], lambda a: (a,), [grad])
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, ref_out)
    assert torch.equal(dy, ref_dy)


def test_non_square_grid_with_grads():
    B, h, w, p, c = 2, 3, 5, 2, 4
    y = torch.randn(B, h * w, p * p * c)
    grad = torch.randn(B, c, h * p, w * p, dtype=torch.float64)
    (out,), (dy,) = run_with_grads(lambda a: unpatchify(a, p, c, grid=(h, w)), [y], lambda a: (a,), [grad])
    (ref_out,), (ref_dy,) = run_with_grads(lambda a: unpatchify_ref(a, p, c, grid=(h, w)), [y], lambda a: (a,),
                                           [grad])
    assert out.shape == (B, c, h * p, w * p)
    assert torch.equal(out, ref_out)
    assert torch.equal(dy, ref_dy)
    # Token (gh, gw), element (i * p + j) * c + ch is pixel (ch, gh * p + i, gw * p + j).
    b, gh, gw, i, j, ch = 1, 2, 4, 1, 0, 3
    assert out[b, ch, gh * p + i, gw * p + j] == y[b, gh * w + gw, (i * p + j) * c + ch]


def test_strided_tokens():
    """A token tensor sliced in its last dim (e.g. the eps half of a wider output) is read in place."""
    wide = torch.randn(2, 16, 2 * 2 * 8)
    y = wide[..., ::2]
    assert not y.is_contiguous()
    assert torch.equal(unpatchify(y, 2, 4), official_unpatchify(y, 2, 4))


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def fail(*args):
        raise AssertionError("the Triton op ran for CPU tensors without TRITON_INTERPRET")

    monkeypatch.setattr(op_module, "_fwd_op", fail)
    y = torch.randn(2, 16, 32)
    assert torch.equal(unpatchify(y, 2, 8), official_unpatchify(y, 2, 8))


@pytest.mark.parametrize(("shape", "p", "c", "grid", "error", "match"), [
    ((2, 16, 32), 2, 4, None, ValueError, r"expected p\*p\*c = 2\*2\*4 = 16"),
    ((2, 15, 32), 2, 8, None, ValueError, "do not form a square grid; pass grid"),
    ((2, 15, 32), 2, 8, (4, 4), ValueError, r"grid \(4, 4\) has 16 cells but y has 15 tokens"),
    ((16, 32), 2, 8, None, ValueError, "y must have 3 dims"),
    ((2, 16, 32), 0, 8, None, ValueError, "must be positive ints"),
])
def test_bad_inputs_raise(shape, p, c, grid, error, match):
    with pytest.raises(error, match=match):
        unpatchify(torch.randn(shape), p, c, grid)
