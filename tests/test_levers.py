"""Training and inference levers that need no GPU to check: the forward reads no device labels (no host sync per
step), labels are checked once per batch on the host, the EMA's one-pass lerp, FSDP2's mixed precision policy, and
the one-line refusals of --fp8 where it cannot run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dit_fast import reference
from dit_fast.cli import main as cli_main
from dit_fast.models.dit import DiTFast
from dit_fast.training.trainer import update_ema
from dit_fast.utils import distributed

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10)


def test_forward_checks_host_labels_once_and_never_reads_device_labels(monkeypatch):
    calls = []
    real = reference.check_labels
    monkeypatch.setattr(reference, "check_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = DiTFast(**TINY).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), torch.tensor([3, 10])
    with torch.no_grad():
        model(x, t, y)
        model.forward_with_cfg(x, t, y, 4.0)
    assert len(calls) == 2  # once per forward, not per block (depth 3)
    with pytest.raises(ValueError, match="labels must be in"):
        model(x, t, torch.tensor([3, 11]))
    # Labels on a CUDA device: reading them (int(y.max())) would synchronise the GPU; under FakeTensorMode any read
    # of a value raises, so getting through the checks proves none happens.
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = (torch.empty(2, 4, 8, 8, device="cuda"), torch.empty(2, dtype=torch.long, device="cuda"),
                torch.empty(2, dtype=torch.long, device="cuda"))
        model.check_inputs(*fake)
        reference.validate_inputs(model.config, *fake)


def test_ema_lerp_is_the_official_update():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(5, 7), torch.nn.Linear(5, 7)
    expected = [0.9999 * e + 0.0001 * p for e, p in zip(ema.parameters(), model.parameters(), strict=True)]
    update_ema(ema, model, 0.9999)
    for got, want in zip(ema.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_fsdp2_shards_the_model_in_bf16_with_fp32_reductions_and_the_ema_in_fp32(monkeypatch):
    sharded = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "fully_shard", lambda module, **kw: sharded.append((module, kw)) or module)
    model, ema = DiTFast(**TINY), DiTFast(**TINY)
    distributed.compile_and_shard(model, ema, compile=False, fsdp=True, param_dtype=torch.bfloat16)
    model_units = [kw for module, kw in sharded if module is model or module in list(model.blocks)]
    ema_units = [kw for module, kw in sharded if module is ema or module in list(ema.blocks)]
    assert len(model_units) == len(ema_units) == TINY["depth"] + 1
    for kw in model_units:
        policy = kw["mp_policy"]
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert all("mp_policy" not in kw for kw in ema_units)
    sharded.clear()
    distributed.compile_and_shard(copy.deepcopy(model), None, compile=False, fsdp=True)  # fp32 training
    assert all("mp_policy" not in kw for _, kw in sharded)


@pytest.mark.parametrize("command", [["train", "--max-steps", "1"], ["sample", "--ckpt", "missing.pt"]])
def test_fp8_refuses_on_the_cpu_in_one_line(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main([*command, "--fp8", "--device", "cpu", *(["--results-dir", str(tmp_path)] if "train" in command
                                                            else ["--out", str(tmp_path / "s.png")])])
    message = str(info.value)
    assert message.startswith(f"dit-fast {command[0]}: --fp8 needs an NVIDIA GPU") and "\n" not in message
    assert not any(tmp_path.iterdir())  # refused before anything was built or written
