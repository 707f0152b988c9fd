"""The attention registry: every backend against an fp64 oracle, the auto choice, fallbacks and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dit_fast.models import attention as A
from tests.helpers import assert_close, max_rel_err

CPU_BACKENDS = [name for name, reason in A.available_backends("cpu", torch.float32, 64).items() if reason is None]
CUDA = torch.cuda.is_available()


def oracle(qkv: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Explicit softmax attention in ``dtype``: (N, T, 3, H, hd) -> (N, T, H, hd)."""
    q, k, v = qkv.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, hd)
    p = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1)
    return (p @ v).transpose(1, 2)


def make_qkv(n: int, t: int, h: int, hd: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """The layout the model feeds: a (N, T, 3, H, hd) view of a (N, T, 3 * H * hd) linear output."""
    g = torch.Generator().manual_seed(n * 1000 + t * 10 + hd)
    flat = torch.randn(n, t, 3 * h * hd, generator=g) * 2
    return flat.to(device=device, dtype=dtype).unflatten(-1, (3, h, hd))


@pytest.fixture(autouse=True)
def fresh_registry_state(monkeypatch):
    """Each test sees no environment default and no earlier warnings."""
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    monkeypatch.setattr(A, "_warned", set())


def test_cpu_registry_has_the_portable_backends():
    assert {"sdpa", "sdpa_flash", "sdpa_math", "math"} <= set(CPU_BACKENDS)
    assert "flash_attn" not in CPU_BACKENDS and "xformers" not in CPU_BACKENDS and "sdpa_cudnn" not in CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 16, 2, 64), (1, 17, 3, 72), (3, 4, 1, 8)], ids=str)
def test_fp32_matches_oracle_with_gradients(backend, shape):
    qkv = make_qkv(*shape, torch.float32).requires_grad_(True)
    out = A.attention(qkv, backend)
    ref_in = qkv.detach().double().requires_grad_(True)
    ref = oracle(ref_in)
    assert out.shape == shape[:2] + shape[2:] and out.dtype == torch.float32
    assert_close(out, ref, atol=1e-5, rtol=1e-5, name=f"{backend} forward")
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    assert_close(qkv.grad, ref_in.grad, atol=1e-4, rtol=1e-4, name=f"{backend} dqkv")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_error_within_twice_plain_pytorch(backend):
    qkv = make_qkv(2, 32, 2, 72, torch.bfloat16)
    ref = oracle(qkv)
    plain_err = max_rel_err(oracle(qkv, torch.bfloat16), ref)  # plain PyTorch computing in bf16
    err = max_rel_err(A.attention(qkv, backend), ref)
    assert err <= 2 * plain_err + 1e-3, f"{backend}: bf16 error {err:.3g} vs plain bf16 {plain_err:.3g}"


def test_sdpa_reads_the_packed_qkv_and_writes_tokens_major():
    qkv = make_qkv(2, 16, 2, 64, torch.float32)
    out = A.attention(qkv, "sdpa")  # q, k, v are strided views of the qkv projection: no copy in
    assert out.is_contiguous()  # (N, T, H, hd) in memory: the reshape to (N, T, D) for the projection is a view


def test_auto_picks_sdpa_on_cpu_and_flash_attn_for_half_cuda_when_installed(monkeypatch):
    assert A.resolve_backend("auto", "cpu", torch.float32, 72) == "sdpa"
    assert A.resolve_backend("auto", "cuda", torch.float32, 72) == "sdpa"
    monkeypatch.setitem(A._OPTIONAL, "flash_attn", object())  # pretend flash-attn is installed
    assert A.resolve_backend("auto", "cuda", torch.bfloat16, 72) == "flash_attn"
    assert A.resolve_backend("auto", "cuda", torch.float32, 72) == "sdpa"  # flash-attn has no fp32
    assert A.resolve_backend("auto", "cuda", torch.float16, 512) == "sdpa"  # head dim beyond 256


def test_auto_without_flash_attn_warns_once(monkeypatch):
    monkeypatch.setitem(A._OPTIONAL, "flash_attn", None)
    with pytest.warns(UserWarning, match=r"pip install dit-fast\[flash\]"):
        assert A.resolve_backend("auto", "cuda", torch.bfloat16, 72) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert A.resolve_backend("auto", "cuda", torch.bfloat16, 72) == "sdpa"


def test_environment_default(monkeypatch):
    monkeypatch.setenv(A.ENV_VAR, "math")
    assert A.default_backend() == "math"
    assert A.resolve_backend("auto", "cpu", torch.float32, 64) == "math"
    assert A.resolve_backend("sdpa", "cpu", torch.float32, 64) == "sdpa"  # an explicit name wins


def test_environment_default_that_cannot_run_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(A.ENV_VAR, "flash_attn")
    with pytest.warns(UserWarning, match="DIT_FAST_ATTENTION=flash_attn cannot run here"):
        assert A.resolve_backend("auto", "cpu", torch.float32, 64) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert A.resolve_backend("auto", "cpu", torch.float32, 64) == "sdpa"


def test_unknown_names_raise(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*valid names: auto, flash_attn"):
        A.attention(make_qkv(1, 4, 1, 8, torch.float32), "flash")
    monkeypatch.setenv(A.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown attention backend 'bogus'"):
        A.resolve_backend("auto", "cpu", torch.float32, 64)


@pytest.mark.parametrize("name,extra", [("flash_attn", "flash"), ("xformers", "xformers")])
def test_missing_package_raises_with_install_hint(monkeypatch, name, extra):
    package = A.BACKENDS[name].package
    monkeypatch.setitem(A._OPTIONAL, package, None)
    with pytest.raises(ImportError, match=rf"not installed.*pip install dit-fast\[{extra}\]"):
        A.require_backend(name)
    with pytest.raises(ImportError, match=rf"pip install dit-fast\[{extra}\]"):
        A.attention(make_qkv(1, 4, 1, 8, torch.float32), name)


def test_explicit_backend_that_cannot_take_the_inputs_raises(monkeypatch):
    with pytest.raises(ValueError, match="sdpa_cudnn.*runs on cuda tensors, got cpu"):
        A.attention(make_qkv(1, 4, 1, 8, torch.float32), "sdpa_cudnn")
    monkeypatch.setitem(A._OPTIONAL, "flash_attn", object())
    with pytest.raises(ValueError, match="flash_attn.*supports float16, bfloat16, got float32"):
        A.resolve_backend("flash_attn", "cuda", torch.float32, 64)
    with pytest.raises(ValueError, match="head dim <= 256, got 320"):
        A.resolve_backend("flash_attn", "cuda", torch.bfloat16, 320)


def test_bad_qkv_shape_raises():
    with pytest.raises(ValueError, match=r"qkv must have shape \(N, T, 3, H, hd\), got \(2, 4, 64\)"):
        A.attention(torch.randn(2, 4, 64))


def test_optional_packages_are_not_imported_with_the_core():
    import subprocess
    import sys

    code = ("import sys, dit_fast, dit_fast.models.dit, dit_fast.models.attention; "
            "print(sorted(m for m in ('flash_attn', 'xformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_backends_match_oracle(dtype):
    qkv = make_qkv(2, 256, 4, 72, dtype, "cuda")
    ref = oracle(qkv)
    plain_err = max_rel_err(oracle(qkv, dtype), ref)
    for name, reason in A.available_backends("cuda", dtype, 72).items():
        if reason is not None:
            continue
        err = max_rel_err(A.attention(qkv, name), ref)
        bound = 1e-5 if dtype == torch.float32 else 2 * plain_err + 1e-3
        assert err <= bound, f"{name} {dtype}: error {err:.3g} > {bound:.3g}"


def test_env_command_reports_backends_and_auto_choice(capsys):
    from dit_fast.cli import main

    assert main(["env", "--device", "cpu", "--head-dim", "72"]) == 0
    out = capsys.readouterr().out
    assert "attention backends on cpu, head dim 72" in out
    assert "auto picks for fp32: sdpa" in out
    assert "flash_attn" in out and "sdpa_cudnn" in out
    from dit_fast.kernels.registry import unsupported_reason

    expected = "torch" if unsupported_reason("onednn") else "onednn"  # oneDNN when this torch build has it
    assert f"fused kernels: auto picks '{expected}' on cpu" in out
