"""modulated_layer_norm: the Triton kernels (in the interpreter) against the reference and fp64."""

from __future__ import annotations

import importlib

import pytest
import torch

from dit_fast.kernels import _row, modulated_layer_norm, modulated_layer_norm_ref

from ._util import DTYPE_MIXES, check_against_references, grads_of

op_module = importlib.import_module("dit_fast.kernels.modulated_layer_norm")

# (B, T, D, backward programs aimed at): batch 1, T not a power of two, D = 1152 (a 1024 + 128 head and tail), D not a
# multiple of 8, D a power of two (no tail tile); a small program target makes the backward walk several rows per
# program, with a partial last block.
SHAPES = [(1, 7, 37, 512), (3, 36, 100, 4), (2, 9, 384, 512), (2, 5, 64, 512), (1, 3, 1152, 2)]


def make_leaves(B: int, T: int, D: int, dtype: torch.dtype, mod_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x (B, T, D) with a non-zero mean in ``dtype``, and the (B, 6D) adaLN output whose chunks are shift/scale in
    ``mod_dtype`` (default: ``dtype``)."""
    x = torch.randn(B, T, D) * 2 + 0.5
    mods = torch.randn(B, 6 * D) * 0.5
    return [x.to(dtype), mods.to(mod_dtype or dtype)]


def from_chunks(x: torch.Tensor, mods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shift, scale = mods.chunk(6, dim=1)[:2]  # (B, D) views with stride (6D, 1)
    return x, shift, scale


@pytest.mark.parametrize(("dtype", "mod_dtype"), DTYPE_MIXES, ids=str)
@pytest.mark.parametrize(("B", "T", "D", "programs"), SHAPES)
def test_matches_reference_and_fp64(B, T, D, programs, dtype, mod_dtype, monkeypatch):
    """Every (x, shift/scale) dtype mix: the output in shift/scale's dtype, grads in their inputs' dtypes."""
    monkeypatch.setattr(_row, "BWD_TARGET_PROGRAMS", programs)
    check_against_references(modulated_layer_norm, modulated_layer_norm_ref, make_leaves(B, T, D, dtype, mod_dtype),
                             from_chunks, f"modulated_layer_norm {dtype}/{mod_dtype} {(B, T, D)}")


def test_mixed_precision_dtype_contract():
    """An fp32 x with bf16 shift/scale (autocast): the output is bf16 for the op and its reference alike."""
    x, shift, scale = from_chunks(*make_leaves(2, 5, 24, torch.float32, torch.bfloat16))
    assert modulated_layer_norm(x, shift, scale).dtype == torch.bfloat16
    assert modulated_layer_norm_ref(x, shift, scale).dtype == torch.bfloat16


def test_strided_x_and_contiguous_modulation():
    """x strided in its token dim (used in place) or in its last dim (copied); contiguous shift/scale."""
    base = torch.randn(2, 10, 48) + 0.3
    mods = torch.randn(2, 2, 48)
    check_against_references(modulated_layer_norm, modulated_layer_norm_ref, [base, mods],
                             lambda b, m: (b[:, ::2], m[:, 0], m[:, 1]), "token-strided x")
    check_against_references(modulated_layer_norm, modulated_layer_norm_ref, [base, mods[..., :24]],
                             lambda b, m: (b[:, :, ::2], m[:, 0], m[:, 1]), "channel-strided x")


def test_backward_is_deterministic(monkeypatch):
    monkeypatch.setattr(_row, "BWD_TARGET_PROGRAMS", 4)
    leaves = make_leaves(2, 33, 100, torch.float32)
    first = grads_of(modulated_layer_norm, leaves, from_chunks)
    second = grads_of(modulated_layer_norm, leaves, from_chunks)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def fail(*args):
        raise AssertionError("the Triton op ran for CPU tensors without TRITON_INTERPRET")

    monkeypatch.setattr(op_module, "_fwd_op", fail)
    x, shift, scale = from_chunks(*make_leaves(2, 5, 16, torch.float32))
    assert torch.equal(modulated_layer_norm(x, shift, scale), modulated_layer_norm_ref(x, shift, scale))


def test_eps_is_used():
    x = torch.randn(1, 4, 8) * 1e-3
    shift, scale = torch.zeros(1, 8), torch.zeros(1, 8)
    for eps in (1e-6, 1e-2):
        torch.testing.assert_close(modulated_layer_norm(x, shift, scale, eps),
                                   modulated_layer_norm_ref(x, shift, scale, eps), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("x", "shift", "scale", "error", "match"), [
    (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), ValueError, "x must have 3 dims"),
    (torch.randn(2, 3, 8), torch.randn(2, 7), torch.randn(2, 8), ValueError, r"shift must have shape \(B, D\)"),
    (torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 3, 8), ValueError, "scale must have 2 dims"),
    (torch.randn(2, 3, 8), torch.randn(2, 8).half(), torch.randn(2, 8), TypeError,
     "shift has dtype torch.float16 but scale has torch.float32; they must match"),
    (torch.randn(2, 3, 8).int(), torch.randn(2, 8), torch.randn(2, 8), TypeError, "x must be float32"),
    (torch.randn(2, 3, 8), torch.randn(2, 8, device="meta"), torch.randn(2, 8), ValueError, "shift is on meta"),
    (torch.randn(2, 3, 8), [0.0] * 8, torch.randn(2, 8), TypeError, "shift must be a torch.Tensor"),
])
def test_bad_inputs_raise(x, shift, scale, error, match):
    with pytest.raises(error, match=match):
        modulated_layer_norm(x, shift, scale)
