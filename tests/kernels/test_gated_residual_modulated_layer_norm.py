"""gated_residual_modulated_layer_norm: the fused block boundary (in the interpreter) against the reference and fp64."""

from __future__ import annotations

import importlib

import pytest
import torch

from dit_fast.kernels import _row, gated_residual_modulated_layer_norm, gated_residual_modulated_layer_norm_ref

from ._util import DTYPE_MIXES, check_against_references, grads_of

op_module = importlib.import_module("dit_fast.kernels.gated_residual_modulated_layer_norm")

# (B, T, D, backward programs aimed at), as in test_modulated_layer_norm.
SHAPES = [(1, 7, 37, 512), (3, 36, 100, 4), (2, 9, 384, 512), (2, 5, 64, 512), (1, 3, 1152, 2)]


def make_leaves(B: int, T: int, D: int, dtype: torch.dtype, mod_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x (B, T, D) in ``dtype``; y (B, T, D) and the (B, 6D) adaLN output (chunk 2 gates y, chunks 3, 4 shift/scale
    the next branch) in ``mod_dtype`` (default: ``dtype``)."""
    mod_dtype = mod_dtype or dtype
    x = torch.randn(B, T, D) + 0.5
    return [x.to(dtype), torch.randn(B, T, D).to(mod_dtype), (torch.randn(B, 6 * D) * 0.5).to(mod_dtype)]


def from_chunks(x: torch.Tensor, y: torch.Tensor, mods: torch.Tensor) -> tuple[torch.Tensor, ...]:
    _, _, gate, shift, scale, _ = mods.chunk(6, dim=1)  # (B, D) views with stride (6D, 1)
    return x, gate, y, shift, scale


@pytest.mark.parametrize("sm_count", [5, 7])
def test_gpu_partition_of_uneven_token_blocks(sm_count, monkeypatch):
    """The partition a GPU gets (a whole multiple of its SM count; blocks of T // n_blocks or one more tokens, here
    uneven) gives the same results as the reference."""
    monkeypatch.setattr(_row, "device_sm_count", lambda device: sm_count)
    n_blocks = _row.backward_partition(2, 23, 48, sm_count)[1]
    assert (2 * n_blocks) % sm_count == 0 and 23 % n_blocks != 0
    check_against_references(gated_residual_modulated_layer_norm, gated_residual_modulated_layer_norm_ref,
                             make_leaves(2, 23, 48, torch.float32), from_chunks, f"uneven blocks, {sm_count} SMs")


@pytest.mark.parametrize(("dtype", "mod_dtype"), DTYPE_MIXES, ids=str)
@pytest.mark.parametrize(("B", "T", "D", "programs"), SHAPES)
def test_matches_reference_and_fp64(B, T, D, programs, dtype, mod_dtype, monkeypatch):
    """Both outputs, and the grads of all five inputs given grads of both outputs, for every (x, rest) dtype mix."""
    monkeypatch.setattr(_row, "BWD_TARGET_PROGRAMS", programs)
    check_against_references(gated_residual_modulated_layer_norm, gated_residual_modulated_layer_norm_ref,
                             make_leaves(B, T, D, dtype, mod_dtype), from_chunks,
                             f"fused block boundary {dtype}/{mod_dtype} {(B, T, D)}")


def test_mixed_precision_dtype_contract():
    """An fp32 stream with bf16 gate/branch/shift/scale (autocast): r stays fp32, out comes out bf16, grads in each
    input's dtype; the reference follows the same contract."""
    x, y, mods = (t.requires_grad_() for t in make_leaves(2, 5, 24, torch.float32, torch.bfloat16))
    for fn in (gated_residual_modulated_layer_norm, gated_residual_modulated_layer_norm_ref):
        r, out = fn(*from_chunks(x, y, mods))
        assert (r.dtype, out.dtype) == (torch.float32, torch.bfloat16)
        x.grad = y.grad = mods.grad = None
        (r.sum() + out.float().sum()).backward()
        assert (x.grad.dtype, y.grad.dtype, mods.grad.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("mod_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("used", ["r", "out"])
def test_grads_when_one_output_is_used(used, mod_dtype):
    """Only r (grad of out is None) or only out (grad of r is None) reaches the loss."""
    pick = 0 if used == "r" else 1

    def fused(*args):
        return gated_residual_modulated_layer_norm(*args)[pick]

    def ref(*args):
        return gated_residual_modulated_layer_norm_ref(*args)[pick]

    check_against_references(fused, ref, make_leaves(2, 6, 40, torch.float32, mod_dtype), from_chunks,
                             f"only {used} used")


def test_strided_inputs():
    x, y = torch.randn(2, 12, 40) + 0.5, torch.randn(2, 6, 80)
    mods = torch.randn(3, 2, 40) * 0.5
    check_against_references(gated_residual_modulated_layer_norm, gated_residual_modulated_layer_norm_ref,
                             [x, y, mods], lambda x_, y_, m: (x_[:, ::2], m[0], y_[:, :, ::2], m[1], m[2]),
                             "strided x and y, contiguous modulation")


def test_backward_is_deterministic(monkeypatch):
    monkeypatch.setattr(_row, "BWD_TARGET_PROGRAMS", 4)
    leaves = make_leaves(2, 33, 100, torch.float32)
    first = grads_of(gated_residual_modulated_layer_norm, leaves, from_chunks)
    second = grads_of(gated_residual_modulated_layer_norm, leaves, from_chunks)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")

    def fail(*args):
        raise AssertionError("the Triton op ran for CPU tensors without TRITON_INTERPRET")

    monkeypatch.setattr(op_module, "_fwd_op", fail)
    args = from_chunks(*make_leaves(2, 5, 16, torch.float32))
    for got, want in zip(gated_residual_modulated_layer_norm(*args), gated_residual_modulated_layer_norm_ref(*args),
                         strict=True):
        assert torch.equal(got, want)


def test_bad_inputs_raise():
    x, y, m = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"shift must have shape \(B, D\)"):
        gated_residual_modulated_layer_norm(x, m, y, torch.randn(2, 9), m)
    with pytest.raises(TypeError, match="shift has dtype torch.float32 but scale has torch.float16"):
        gated_residual_modulated_layer_norm(x, m, y, m, m.half())
    with pytest.raises(ValueError, match="y shape"):
        gated_residual_modulated_layer_norm(x, m, y[:, :2], m, m)
