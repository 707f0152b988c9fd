"""FP8 linears (dit_fast.fp8) on the CPU: which linears convert, the state dict unchanged, forward and backward in
torchao's emulation within a few times bf16's error, and the one-line refusals (CPU, old GPU, torchao missing)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from dit_fast.models import fp8
from dit_fast.models.dit import DiTFast
from dit_fast.reference import DiT
from tests.helpers import max_rel_err, randomize

TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)
needs_torchao = pytest.mark.skipif(fp8.torchao_unavailable_reason() is not None,
                                   reason=str(fp8.torchao_unavailable_reason()))



def inputs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([3, 500, 999, 40][:n]), torch.tensor([1, 2, 10, 4][:n])


@needs_torchao
@pytest.mark.parametrize("cls", [DiT, DiTFast])
def test_only_the_block_token_linears_convert(cls):
    model = cls(**TINY)
    keys = {k: v.dtype for k, v in model.state_dict().items()}
    converted = fp8.convert_linears(model, emulate=True)
    expected = [f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert converted == expected and fp8.fp8_linears(model) == expected
    kept = ("blocks.0.adaLN_modulation.1", "t_embedder.mlp.0", "final_layer.linear", "final_layer.adaLN_modulation.1")
    for name in kept:
        assert type(model.get_submodule(name)) is torch.nn.Linear, name
    assert {k: v.dtype for k, v in model.state_dict().items()} == keys  # checkpoints are unchanged


@needs_torchao
def test_dimensions_not_multiples_of_16_stay_high_precision():
    model = DiT(**{**TINY, "hidden_size": 72, "num_heads": 2})  # 72 % 16 = 8: no block linear qualifies
    assert fp8.convert_linears(model, emulate=True) == []


@needs_torchao
def test_emulated_fp8_forward_and_backward_within_a_few_times_bf16_error():
    reference = randomize(DiT(**TINY)).eval()
    model = DiTFast(**TINY)
    model.load_state_dict(reference.state_dict())
    model.eval()
    fp8.convert_linears(model, emulate=True)
    x, t, y = inputs()
    with torch.no_grad():
        exact = reference(x, t, y)
        bf16_err = max_rel_err(copy.deepcopy(reference).bfloat16()(x.bfloat16(), t, y).float(), exact)
        fp8_err = max_rel_err(model(x, t, y), exact)
    assert 0 < fp8_err <= 4 * bf16_err, (fp8_err, bf16_err)
    model(x, t, y).square().mean().backward()
    grad = model.blocks[0].mlp.fc1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_refuses_in_one_line_where_fp8_cannot_run(monkeypatch):
    with pytest.raises(fp8.Fp8Unavailable, match=r"^--fp8 needs an NVIDIA GPU .*not the cpu$") as info:
        fp8.enable_fp8(DiTFast(**TINY))
    assert "\n" not in str(info.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert fp8.fp8_unavailable_reason("cuda") == ("--fp8 needs compute capability >= 8.9 (Ada, Hopper); "
                                                  "NVIDIA A100-SXM4-80GB is sm_80")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else
                        real_find_spec(name, *a))
    assert fp8.fp8_unavailable_reason("cuda") == "--fp8 needs torchao, which is not installed: pip install torchao"
    with pytest.raises(fp8.Fp8Unavailable, match="pip install torchao"):
        fp8.convert_linears(DiT(**TINY))
