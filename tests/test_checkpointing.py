"""Activation checkpointing modes (none, full, selective) of DiTFast and the reference: the same gradients, and
selective checkpointing recomputes no GEMM while full checkpointing recomputes every one."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dit_fast.models.checkpointing import checkpoint_mode
from dit_fast.models.dit import DiTFast
from dit_fast.reference import DiT
from tests.helpers import perturb_

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class CountGemms(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in GEMMS or "onednn_linear" in str(func)
        return func(*args, **(kwargs or {}))


def grads_and_backward_gemms(model: torch.nn.Module, mode: str) -> tuple[list[torch.Tensor], int]:
    model.gradient_checkpointing = mode
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, requires_grad=True)
    out = model(x, torch.tensor([1, 500, 999]), torch.tensor([1, 2, 10]))
    with CountGemms() as counter:
        out.square().mean().backward()
    return [x.grad] + [p.grad for p in model.parameters()], counter.count


@pytest.mark.parametrize("cls", [DiT, DiTFast])
def test_modes_give_the_same_gradients_selective_recomputes_no_gemm(cls):
    torch.manual_seed(0)
    model = perturb_(cls(**TINY), 0.05).eval()
    grads, gemms = {}, {}
    for mode in ("none", "full", "selective"):
        grads[mode], gemms[mode] = grads_and_backward_gemms(model, mode)
    for mode in ("full", "selective"):
        for a, b in zip(grads[mode], grads["none"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert gemms["selective"] == gemms["none"] < gemms["full"], gemms


def test_mode_values():
    assert [checkpoint_mode(v) for v in (True, False, None, "selective")] == ["full", "none", "none", "selective"]
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of none, full, selective"):
        checkpoint_mode("some")
