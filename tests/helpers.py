"""Shared test helpers: one ``assert_close`` that reports the worst elements, fixture paths, tiny random DiTs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dit_fast.reference import DiT

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
OFFICIAL_FIXTURE = FIXTURES / "official_dit.safetensors"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5,
                 name: str = "tensor") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    On failure, prints the shape, the max abs/rel error and the five worst elements with their indices.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values in actual"
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    excess = diff - bound
    if (excess <= 0).all():
        return
    flat = excess.flatten()
    worst = flat.topk(min(5, flat.numel())).indices
    lines = []
    for i in worst.tolist():
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        lines.append(f"  at {idx}: actual={a[idx].item():.8g} expected={e[idx].item():.8g} "
                     f"diff={diff[idx].item():.3g}")
    n_bad = int((excess > 0).sum())
    rel = (diff / e.abs().clamp_min(1e-12)).max().item()
    raise AssertionError(
        f"{name}: {n_bad}/{a.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
        f"max abs err {diff.max().item():.3g}, max rel err {rel:.3g}, shape {tuple(a.shape)}\n" + "\n".join(lines)
    )


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``max|a - e| / max|e|`` (robust to elements near zero)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def load_official_fixture(prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of ``official_dit.safetensors`` whose names start with ``prefix + '.'``, prefix stripped.

    Skips the calling test (with the path) when the shared fixtures folder is absent.
    """
    import pytest
    from safetensors.torch import load_file

    if not OFFICIAL_FIXTURE.is_file():
        pytest.skip(f"official DiT fixtures not found at {OFFICIAL_FIXTURE} (shared/fixtures is not checked out here)")
    tensors = load_file(str(OFFICIAL_FIXTURE))
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def perturb_(model: nn.Module, scale: float) -> nn.Module:
    """Add ``scale`` * N(0, 1) (global RNG) to every parameter in place and return ``model``: adaLN-Zero's zero init
    would otherwise make every block's contribution, and most gradients, zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values (seeded) in EVERY parameter, the zero-initialised adaLN and final layers included; returns
    ``model``. Scaled by fan-in so activations stay O(1) through the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 / max(1, p.shape[-1]) ** 0.25)
    return model


def tiny_dit(depth: int = 1, scale: float = 0.02, in_channels: int = 1, input_size: int = 8) -> DiT:
    """A digits-shaped reference DiT (hidden 32, 2 heads, patch 2, 10 classes) seeded 0, perturbed, in eval mode."""
    torch.manual_seed(0)
    model = DiT(input_size=input_size, patch_size=2, in_channels=in_channels, hidden_size=32, depth=depth,
                num_heads=2, num_classes=10)
    return perturb_(model, scale).eval()
