"""gated_residual: the Triton kernels (in the interpreter) against the reference and fp64."""

from __future__ import annotations

import importlib

import pytest
import torch

from dit_fast.kernels import _row, gated_residual, gated_residual_ref

from ._util import DTYPE_MIXES, check_against_references, grads_of

op_module = importlib.import_module("dit_fast.kernels.gated_residual")

# (B, T, D, backward programs aimed at), as in test_modulated_layer_norm.
SHAPES = [(1, 7, 37, 512), (3, 36, 100, 4), (2, 9, 384, 512), (2, 5, 64, 512), (1, 3, 1152, 2)]


def make_leaves(B: int, T: int, D: int, dtype: torch.dtype, mod_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x (B, T, D) in ``dtype``; y (B, T, D) and the (B, 6D) adaLN output whose third chunk is the gate in
    ``mod_dtype`` (default: ``dtype``)."""
    mod_dtype = mod_dtype or dtype
    return [torch.randn(B, T, D).to(dtype), torch.randn(B, T, D).to(mod_dtype), torch.randn(B, 6 * D).to(mod_dtype)]


def from_chunks(x: torch.Tensor, y: torch.Tensor, mods: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x, mods.chunk(6, dim=1)[2], y  # gate: (B, D) view with stride (6D, 1)


@pytest.mark.parametrize(("dtype", "mod_dtype"), DTYPE_MIXES, ids=str)
@pytest.mark.parametrize(("B", "T", "D", "programs"), SHAPES)
def test_matches_reference_and_fp64(B, T, D, programs, dtype, mod_dtype, monkeypatch):
    """Every (x, gate/y) dtype mix: the result in x's dtype, grads in their inputs' dtypes."""
    monkeypatch.setattr(_row, "BWD_TARGET_PROGRAMS", programs)
    check_against_references(gated_residual, gated_residual_ref, make_leaves(B, T, D, dtype, mod_dtype), from_chunks,
                             f"gated_residual {dtype}/{mod_dtype} {(B, T, D)}")


def test_mixed_precision_dtype_contract():
    """An fp32 stream with a bf16 gate and branch (autocast): the result stays fp32, for the op and its reference."""
    x, gate, y = from_chunks(*make_leaves(2, 5, 24, torch.float32, torch.bfloat16))
    assert gated_residual(x, gate, y).dtype == torch.float32
    assert gated_residual_ref(x, gate, y).dtype == torch.float32


def test_strided_inputs():
    """x strided in its token dim, y in its last dim (copied), a contiguous gate."""
    x, y, gate = torch.randn(2, 12, 40), torch.randn(2, 6, 80), torch.randn(2, 40)
    check_against_references(gated_residual, gated_residual_ref, [x, y, gate],
                             lambda x_, y_, g: (x_[:, ::2], g, y_[:, :, ::2]), "strided x and y")


def test_backward_is_deterministic(monkeypatch):
    monkeypatch.setattr(_row, "BWD_TARGET_PROGRAMS", 4)
    leaves = make_leaves(2, 33, 100, torch.float32)
    first = grads_of(gated_residual, leaves, from_chunks)
    second = grads_of(gated_residual, leaves, from_chunks)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def fail(*args):
        raise AssertionError("the Triton op ran for CPU tensors without TRITON_INTERPRET")

    monkeypatch.setattr(op_module, "_fwd_op", fail)
    x, gate, y = from_chunks(*make_leaves(2, 5, 16, torch.float32))
    assert torch.equal(gated_residual(x, gate, y), gated_residual_ref(x, gate, y))


@pytest.mark.parametrize(("x", "gate", "y", "error", "match"), [
    (torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 4, 8), ValueError, "y shape"),
    (torch.randn(2, 3, 8), torch.randn(3, 8), torch.randn(2, 3, 8), ValueError, r"gate must have shape \(B, D\)"),
    (torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 3, 8).double(), TypeError, "y must be float32"),
    (torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 3, 8, device="meta"), ValueError, "y is on meta"),
    (torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8), ValueError, "x must have 3 dims"),
])
def test_bad_inputs_raise(x, gate, y, error, match):
    with pytest.raises(error, match=match):
        gated_residual(x, gate, y)
