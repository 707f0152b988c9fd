"""bf16 inference: ``DiTFast.for_inference`` (weights cast once, fp32 residual stream), its error against fp64 next
to the plain reference's in bf16, the sampling dtype rule (``--dtype auto``) and sampling without autocast."""

from __future__ import annotations

import copy

import pytest
import torch

from dit_fast.models.dit import DiTFast
from dit_fast.reference import DiT
from dit_fast.sampling.generate import cast_for_sampling, generate
from dit_fast.utils import hardware
from tests.helpers import max_rel_err, randomize

# Hidden 1152 (DiT-XL's width, 16 heads of 72), 36 tokens (not a power of two), 2 blocks: XL's numerics, cheaply.
XL_WIDTH = dict(input_size=12, patch_size=2, hidden_size=1152, depth=2, num_heads=16, num_classes=10)



@pytest.mark.parametrize("batch", [1, 3])
def test_bf16_forward_error_is_no_worse_than_the_reference_in_bf16(batch):
    ref = randomize(DiT(**XL_WIDTH)).eval()
    fast = DiTFast(**XL_WIDTH)
    fast.load_state_dict(ref.state_dict())
    fast.for_inference(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in fast.parameters())
    assert fast.residual_dtype == torch.float32 and not fast.training
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 12, 12, generator=g)
    t, y = torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 11, (batch,), generator=g)
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x.double(), t, y)
        ref_err = max_rel_err(copy.deepcopy(ref).bfloat16()(x.bfloat16(), t, y), exact)
        err = max_rel_err(fast(x.bfloat16(), t, y), exact)
    assert err <= ref_err, f"DiTFast bf16 error {err:.3g} > the reference's in bf16 {ref_err:.3g}"


def test_for_inference_fp32_is_the_model_as_loaded():
    ref = randomize(DiT(**XL_WIDTH)).eval()
    fast = DiTFast(**XL_WIDTH)
    fast.load_state_dict(ref.state_dict())
    fast.for_inference(torch.float32)
    assert fast.residual_dtype is None and fast.activation_dtype is None
    x, t, y = torch.randn(2, 4, 12, 12), torch.tensor([3, 999]), torch.tensor([1, 10])
    with torch.no_grad():
        assert max_rel_err(fast(x, t, y), ref(x, t, y)) < 1e-5
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        fast.for_inference(torch.float64)


def test_a_move_re_derives_the_weight_only_setting(monkeypatch):
    """bf16 weights set up where the CPU has no bf16 GEMM keep fp32 activations; moved to a device that has one (here:
    the route probe answering differently, as a GPU would) they compute in bf16; cast to fp32, in fp32."""
    import dit_fast.models.dit as dit_module

    tiny = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    fast = randomize(DiTFast(**tiny))
    monkeypatch.setattr(dit_module, "cpu_linear_route", lambda dtype: "onednn-fp32")
    fast.for_inference(torch.bfloat16)
    assert fast.activation_dtype == torch.float32 and fast.residual_dtype == torch.float32
    monkeypatch.setattr(dit_module, "cpu_linear_route", lambda dtype: "onednn")
    fast.to("cpu")
    assert fast.activation_dtype is None and fast.residual_dtype == torch.float32
    monkeypatch.setattr(dit_module, "cpu_linear_route", lambda dtype: "onednn-fp32")
    fast.float()
    assert fast.activation_dtype is None
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([1, 10])
    with torch.no_grad():
        assert fast(x, t, y).dtype == torch.float32


def test_auto_dtype_rule(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    dtype, why = hardware.inference_dtype("cpu")
    assert dtype == torch.float32 and "no AVX512-BF16 or AMX" in why
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.inference_dtype("cpu") == (torch.bfloat16, "auto: bf16, the CPU has avx512_bf16 (bf16 GEMM "
                                                              "instructions)")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert hardware.inference_dtype("cpu")[0] == torch.bfloat16
    assert hardware.inference_dtype("cpu", "fp32")[0] == torch.float32
    assert hardware.inference_dtype("cpu", "bf16")[0] == torch.bfloat16
    with pytest.raises(ValueError, match="choose auto, fp32 or bf16"):
        hardware.inference_dtype("cpu", "fp16")


def test_generate_casts_once_and_never_autocasts(monkeypatch):
    """bf16 sampling runs a bf16 copy (the caller's model untouched), with no autocast region, and drifts from fp32
    sampling no more than the plain reference sampled in bf16 (x2)."""
    tiny = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    ref = randomize(DiT(**tiny)).eval()
    fast = DiTFast(**tiny).eval()
    fast.load_state_dict(ref.state_dict())
    cast = cast_for_sampling(fast, torch.bfloat16)
    assert cast is not fast and next(fast.parameters()).dtype == torch.float32
    assert next(cast.parameters()).dtype == torch.bfloat16 and cast.residual_dtype == torch.float32
    assert cast_for_sampling(fast, None) is fast and cast_for_sampling(fast, torch.float32) is fast
    entered = []
    real = torch.autocast.__enter__
    monkeypatch.setattr(torch.autocast, "__enter__", lambda self: entered.append(self._enabled) or real(self))
    labels = torch.tensor([1, 7, 3])
    kw = {"sampler": "ddim", "num_steps": 5, "cfg_scale": 2.0, "seed": 0, "progress": False}
    low = generate(fast, labels, dtype=torch.bfloat16, **kw)
    assert not any(entered)  # only the timestep MLP's autocast-off region
    full = generate(fast, labels, **kw)
    ref_err = max_rel_err(generate(ref, labels, dtype=torch.bfloat16, **kw), generate(ref, labels, **kw))
    assert low.dtype == torch.float32 and max_rel_err(low, full) <= 2 * ref_err  # the plain reference's bf16 drift


def test_compiled_bf16_model_takes_the_same_routes():
    """``DiTFast.compile()`` on a bf16 model: the GEMM routes are constants for the compiler (no fake-tensor probe)."""
    tiny = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    fast = DiTFast(**tiny)
    fast.load_state_dict(randomize(DiT(**tiny)).state_dict())
    fast.for_inference(torch.bfloat16)
    compiled = copy.deepcopy(fast).compile()
    x, t, y = torch.randn(2, 4, 8, 8).bfloat16(), torch.tensor([1, 500]), torch.tensor([1, 3])
    with torch.no_grad():
        assert max_rel_err(compiled(x, t, y), fast(x, t, y)) < 1e-2
