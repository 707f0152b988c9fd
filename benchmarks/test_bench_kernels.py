"""Fused kernels (``dit_fast.kernels``) against the unfused PyTorch sequences they replace.

One group per op ("kernel <op>"). On a GPU, each op runs at DiT-XL/2 shapes (T = 256 tokens, D = 1152, bf16, batch 32
and 256) as three implementations on the same inputs: "reference" (the plain ``<op>_ref`` sequence, eager),
"reference+compile" (that sequence compiled by inductor) and "dit_fast" (the fused Triton op), forward ("fwd") and
forward + backward ("fwd+bwd", for the differentiable row ops). Each round is one ``triton.testing.do_bench`` (L2
flushed between calls, median of its repetitions) inside the benchmarked callable: the per-call time is
``extra_info["seconds"]`` (pytest-benchmark's own columns time whole ``do_bench`` rounds there). On a CPU only the
reference path runs, at small shapes, with pytest-benchmark's timer, so the suite runs anywhere in seconds.

``extra_info``: ``impl``, ``case``, ``seconds`` (median per call), ``gbytes`` (the bytes one call must move at least:
each input read and each output written once, in the run's dtype), ``gbps`` (at the median time), ``gflop`` (about
the elementwise operation count of one call, 2 x the multiply-adds in spirit: LayerNorm ~8 per element, a gated
residual 2, the patch copies 0), ``gflops``, ``max_rel_err`` (``max|out - ref| / max|ref|`` over outputs and grads
against the plain reference in fp32 on the same inputs; asserted under the dtype's tolerance), ``dtype``, ``device``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

import dit_fast.kernels as K
from benchmarks.common import kernel_seconds

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the fused kernels are timed on CUDA only)")

TOKENS, HIDDEN, PATCH, LATENT, LATENT_CHANNELS, OUT_CHANNELS = 256, 1152, 2, 32, 4, 8  # DiT-XL/2 at 256 px
CPU_TOKENS, CPU_HIDDEN, CPU_BATCH = 64, 384, 2
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

Args = tuple


@dataclass(frozen=True)
class KernelOp:
    """One fused op: its public function, the unfused reference, inputs, and its ideal traffic and work.

    ``make_args(batch, tokens, hidden, device, dtype)`` returns the op's arguments (tensors first, then ints);
    ``elements(args)`` the number of output elements of one call (B*T*D or the image size); ``fwd_bytes``/``bwd_bytes``
    are the tensors' read+write counts in units of those elements plus (B, D) vectors; ``flops_per_element`` the
    approximate operation count.
    """

    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    ref: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    make_args: Callable[[int, int, int, torch.device, torch.dtype], Args]
    fwd_streams: int  # full-size tensors read or written once by the forward
    bwd_streams: int  # and by the backward (0: not benchmarked backward)
    vectors: int  # (B, D) modulation vectors read by the forward
    flops_per_element: float


def _row_tensors(batch: int, tokens: int, hidden: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """x, y (B, T, D) and the six (B, D) chunks of an adaLN output (views with stride (6D, 1), as in the model), drawn
    on ``device`` (at batch 256 a CPU draw of the 150M values would take longer than the kernels' timing)."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, tokens, hidden, generator=gen, device=device).to(dtype)
    y = torch.randn(batch, tokens, hidden, generator=gen, device=device).to(dtype)
    mods = (torch.randn(batch, 6 * hidden, generator=gen, device=device) * 0.5).to(dtype)
    return x, y, mods.chunk(6, dim=1)


def _modulated_layer_norm_args(*size) -> Args:
    x, _, (_, _, _, shift, scale, _) = _row_tensors(*size)
    return (x, shift, scale)


def _gated_residual_args(*size) -> Args:
    x, y, (_, _, gate, _, _, _) = _row_tensors(*size)
    return (x, gate, y)


def _block_boundary_args(*size) -> Args:
    x, y, (_, _, gate, shift, scale, _) = _row_tensors(*size)
    return (x, gate, y, shift, scale)


def _patchify_args(batch: int, tokens: int, hidden: int, device: torch.device, dtype: torch.dtype) -> Args:
    side = PATCH * int(tokens**0.5)
    x = torch.randn(batch, LATENT_CHANNELS, side, side, generator=torch.Generator(device).manual_seed(0), device=device)
    return (x.to(dtype), PATCH)


def _unpatchify_args(batch: int, tokens: int, hidden: int, device: torch.device, dtype: torch.dtype) -> Args:
    y = torch.randn(batch, tokens, PATCH * PATCH * OUT_CHANNELS, generator=torch.Generator(device).manual_seed(0),
                    device=device)
    return (y.to(dtype), PATCH, OUT_CHANNELS)


OPS: dict[str, KernelOp] = {
    "modulated_layer_norm": KernelOp(K.modulated_layer_norm, K.modulated_layer_norm_ref, _modulated_layer_norm_args,
                                     fwd_streams=2, bwd_streams=3, vectors=2, flops_per_element=8),
    "gated_residual": KernelOp(K.gated_residual, K.gated_residual_ref, _gated_residual_args,
                               fwd_streams=3, bwd_streams=3, vectors=1, flops_per_element=2),
    "gated_residual_modulated_layer_norm": KernelOp(
        K.gated_residual_modulated_layer_norm, K.gated_residual_modulated_layer_norm_ref, _block_boundary_args,
        fwd_streams=4, bwd_streams=6, vectors=3, flops_per_element=10),
    "patchify": KernelOp(K.patchify, K.patchify_ref, _patchify_args, fwd_streams=2, bwd_streams=0, vectors=0,
                         flops_per_element=0),
    "unpatchify": KernelOp(K.unpatchify, K.unpatchify_ref, _unpatchify_args, fwd_streams=2, bwd_streams=0,
                           vectors=0, flops_per_element=0),
}


def _cases() -> list:
    cases = [pytest.param(op, "reference", "fwd", CPU_BATCH, "cpu", id=f"{op}-cpu-reference-fwd")
             for op in OPS]
    for op, spec in OPS.items():
        for mode in ("fwd", "fwd+bwd") if spec.bwd_streams else ("fwd",):
            for batch in (32, 256):
                for impl in ("reference", "reference+compile", "dit_fast"):
                    cases.append(pytest.param(op, impl, mode, batch, "cuda", marks=gpu,
                                              id=f"{op}-cuda-B{batch}-{impl}-{mode}"))
    return cases


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _callable(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], args: Args, mode: str,
              grad_outputs: Sequence[torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One call of the case: the forward, or forward + backward for the given output grads (returns outputs and
    the grads of every tensor input, computed with ``autograd.grad``: nothing accumulates between calls)."""
    if mode == "fwd":
        return lambda: _as_tuple(fn(*args))
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    grads = [g.to(tensors[0].dtype) for g in grad_outputs]  # cast once, outside the timed call

    def step() -> tuple[torch.Tensor, ...]:
        outs = _as_tuple(fn(*leaves))
        return outs + torch.autograd.grad(outs, tensors, grads)

    return step



def _max_rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item()
               for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize(("op", "impl", "mode", "batch", "device"), _cases())
def test_kernel(benchmark, op: str, impl: str, mode: str, batch: int, device: str) -> None:
    spec = OPS[op]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, hidden = (TOKENS, HIDDEN) if device == "cuda" else (CPU_TOKENS, CPU_HIDDEN)
    args = spec.make_args(batch, tokens, hidden, torch.device(device), dtype)
    fn = {"reference": spec.ref, "dit_fast": spec.fn}.get(impl) or torch.compile(spec.ref,
                                                                                              fullgraph=True)
    with torch.no_grad():
        outputs = _as_tuple(spec.ref(*args))
    gen = torch.Generator(device).manual_seed(1)
    grad_outputs = [torch.randn(o.shape, generator=gen, device=device) for o in outputs]  # fp32, shared with the oracle
    call = _callable(fn, args, mode, grad_outputs)
    benchmark.group = f"kernel {op}"
    seconds = kernel_seconds(benchmark, call, device, cpu_rounds=20)

    fp32_args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
    err = _max_rel_err(call(), _callable(spec.ref, fp32_args, mode, grad_outputs)())

    elements = outputs[0].numel()
    vector_elems = batch * hidden * spec.vectors
    streams = spec.fwd_streams + (spec.bwd_streams if mode == "fwd+bwd" else 0)
    gbytes = (streams * elements + vector_elems) * args[0].element_size() / 1e9
    gflop = spec.flops_per_element * elements * (3 if mode == "fwd+bwd" else 1) / 1e9
    info = {"impl": impl, "case": f"{mode} B={batch} T={tokens} D={hidden} {str(dtype).removeprefix('torch.')}",
            "gbytes": gbytes, "gflop": gflop, "max_rel_err": err, "tolerance": TOLERANCE[dtype],
            "dtype": str(dtype).removeprefix("torch."), "device": device}
    if seconds:
        info.update(seconds=seconds, gbps=gbytes / seconds, gflops=gflop / seconds)
    benchmark.extra_info.update(info)
    assert err <= TOLERANCE[dtype], f"{impl} {op} {mode}: max_rel_err {err:.3g} > {TOLERANCE[dtype]:.3g}"
