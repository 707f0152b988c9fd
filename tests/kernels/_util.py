"""Checks shared by the kernel tests: a fused op against its reference in the same dtype and in fp64."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tests.helpers import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (residual stream dtype, modulation/branch dtype): every combination, e.g. an fp32 stream under bf16 autocast.
DTYPE_MIXES = [(x, m) for x in DTYPES for m in DTYPES]

Op = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def run_with_grads(fn: Op, leaves: Sequence[torch.Tensor], build: Callable[..., Sequence[torch.Tensor]],
                   grad_outputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of ``fn(*build(*leaves))`` and the grads of ``sum(out * grad_out)`` w.r.t. (copies of) the leaves.

    ``build`` turns leaves into the op's arguments, e.g. chunks a (B, 6D) leaf into strided (B, D) views.
    """
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    outs = _as_tuple(fn(*build(*leaves)))
    torch.autograd.backward(outs, [g.to(device=o.device, dtype=o.dtype)
                                   for o, g in zip(outs, grad_outputs, strict=True)])
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def check_against_references(fn: Op, ref: Op, leaves: Sequence[torch.Tensor],
                             build: Callable[..., Sequence[torch.Tensor]], name: str) -> None:
    """Compare ``fn`` (the kernels) with ``ref`` (plain PyTorch) on the same leaves and with ``ref`` in fp64.

    Checks every output and the grad of every leaf, for random output grads; leaves may mix dtypes (an fp32 stream
    with bf16 modulation). Outputs must come in the reference's dtypes, grads in their leaf's dtype. All-fp32 leaves:
    the kernels within 1e-5 of fp64 and of the fp32 reference. Otherwise: the kernels' max error vs fp64 at most 2x
    that of the reference on the same leaves, plus one unit of rounding of the result's dtype (eps x its magnitude).
    """
    all_fp32 = all(t.dtype == torch.float32 for t in leaves)
    with torch.no_grad():
        probe = _as_tuple(ref(*build(*leaves)))
    grad_outputs = [torch.randn(o.shape, dtype=torch.float64) for o in probe]
    outs, grads = run_with_grads(fn, leaves, build, grad_outputs)
    ref_outs, ref_grads = run_with_grads(ref, leaves, build, grad_outputs)
    exact_outs, exact_grads = run_with_grads(ref, [t.double() for t in leaves], build, grad_outputs)
    labels = [f"{name} output {i}" for i in range(len(outs))] + [f"{name} grad of leaf {i}" for i in range(len(grads))]
    dtypes = [o.dtype for o in probe] + [t.dtype for t in leaves]
    for label, dtype, got, same_dtype, exact in zip(labels, dtypes, outs + grads, ref_outs + ref_grads,
                                                    exact_outs + exact_grads, strict=True):
        assert got.dtype == dtype, f"{label}: dtype {got.dtype} != {dtype}"
        if all_fp32:
            assert_close(got, exact, atol=1e-5, rtol=1e-5, name=f"{label} vs fp64")
            assert_close(got, same_dtype, atol=1e-5, rtol=1e-5, name=f"{label} vs fp32 reference")
        else:
            err = (got.double() - exact).abs().max().item()
            ref_err = (same_dtype.double() - exact).abs().max().item()
            floor = torch.finfo(dtype).eps * exact.abs().max().item()
            assert err <= 2 * ref_err + floor, (f"{label}: max error vs fp64 {err:.3g} > 2 x the reference's "
                                                f"{ref_err:.3g} on the same {dtype} inputs + {floor:.3g}")


def grads_of(fn: Op, leaves: Sequence[torch.Tensor], build: Callable[..., Sequence[torch.Tensor]],
             seed: int = 0) -> list[torch.Tensor]:
    """Outputs and leaf grads of one run of ``fn`` with seeded random output grads (for determinism checks)."""
    with torch.no_grad():
        probe = _as_tuple(fn(*build(*leaves)))
    gen = torch.Generator().manual_seed(seed)
    grad_outputs = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in probe]
    outs, grads = run_with_grads(fn, leaves, build, grad_outputs)
    return outs + grads
