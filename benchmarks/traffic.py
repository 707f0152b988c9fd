"""Memory traffic, GEMM work and kernel launches of one DiT forward, counted from a dispatch-level trace.

    python -m benchmarks.traffic                                   # DiT-S/2, batch 2, every implementation and mode
    python -m benchmarks.traffic --config DiT-XL/2 --batch 8 --modes autocast --breakdown
    python -m benchmarks.traffic --gpu H100,H200 --json traffic.json   # + roofline PREDICTION; JSON for the report

For each implementation (``reference``: ``dit_fast.reference.DiT``; ``dit_fast-triton``: ``DiTFast`` with the Triton
kernels, run by the Triton interpreter on a CPU; ``dit_fast-torch``: ``DiTFast`` with the plain-PyTorch kernels,
eager) and precision mode (``fp32``; ``bf16``: bf16 weights and input; ``autocast``: fp32 weights under
``torch.autocast(bfloat16)``, the training and sampling default), one inference forward (no grad) is traced after
one untraced warm-up forward (caches, lazy initialisation and JIT compilation happen there), on the device chosen.

Counting rules (a ``TorchDispatchMode`` sees every op that reaches the dispatcher's backend, below autograd and
autocast; ops an op calls internally are not seen):

- **One dispatched op = one GPU kernel launch.** An aten op that runs several kernels internally (a cuBLAS split-K
  reduction, say) counts as one; ``_local_scalar_dense`` (``.item()``, a device-to-host copy and a sync) counts as
  one.
- **Free:** view and metadata ops (every op whose schema returns an alias, e.g. ``view``, ``t``, ``permute``,
  ``expand``, ``split``, ``unbind``, ``detach``; and ``_unsafe_view``) and allocations (``empty``,
  ``empty_strided``, ``empty_like``, ``new_empty``, ``resize_``): no launch, no bytes.
- **Bytes of a kernel** = each distinct tensor it reads plus each distinct tensor it writes, once, counting the
  elements a view actually spans (a broadcast dimension, stride 0, is read once: ``shift[:, None]`` costs (N, D),
  not (N, T, D)). In-place ops read and write their target; ``copy_``, ``fill_``, ``zero_`` and the random fills
  only write it. A gather (``embedding``, ``index_select``, ``gather``, ``index``) reads of its source only as
  many elements as it writes (the label embedding reads N rows of the table, not the table). This is the traffic of
  a kernel that reads its inputs and writes its outputs once (no re-reads, cache hits ignored): a lower bound of
  what the hardware moves.
- **GEMMs** (``mm``, ``addmm``, ``_addmm_activation``, ``bmm``, ``baddbmm``, ``linear``, ``convolution`` (the
  reference's patch embedding), the CPU path's ``dit_fast::onednn_linear`` / ``mkldnn::_linear_pointwise``, and
  attention) count their work as GEMM flops (2 x multiply-adds) and their operand bytes (inputs, bias and output)
  apart from the non-GEMM bytes. **Attention** is a GEMM op: every SDPA kernel (``_scaled_dot_product_flash_attention``,
  ``..._efficient_...``, ``..._cudnn_...``, ``..._for_cpu``, ...), flash-attn's and xformers' forward ops: one launch,
  flops ``2 * N * H * T * S * (hd + hd_v)`` (QK^T and AV), bytes q, k, v, the output and the log-sum-exp. A backend
  that decomposes attention (SDPA's math kernel, the ``math`` backend) shows its ``bmm`` s as GEMMs and its softmax
  and scaling as non-GEMM kernels, which is what it launches.
- **Custom ops:** a ``torch.library`` op such as ``dit_fast::gated_residual_modulated_layer_norm`` (how the Triton
  kernels dispatch) is one dispatched op, hence one launch whose bytes are its tensor inputs and outputs (for the
  fused row ops the saved fp32 mean/rstd too). That is what each forward launcher of ``dit_fast.kernels`` does:
  check, allocate, launch one Triton kernel. Work a launcher does besides (a ``.contiguous()`` copy of an input
  whose last dim is strided, never the case in a DiTFast forward) is inside the op and not seen.
- **Weight casts** (counted apart, both launches and bytes): a ``_to_copy`` that changes dtype and whose source
  existed before the forward began and is not one of its inputs: a parameter, buffer or cached stacked weight,
  cast again every forward (autocast's casts of the weights, DiTFast's fp32 copies of the timestep MLP's bf16
  weights). A deployment could cast them once; a training step under autocast pays them every step.
- Totals are per forward; bytes and flops are also given per image (divided by the batch). ``launches`` counts every
  kernel (GEMMs and weight casts included); ``non-GEMM bytes`` exclude GEMM operands and weight casts.

On a CPU the DiTFast linears run oneDNN with the bias (and, without gradients, the tanh-GELU) in the GEMM epilogue
(``dit_fast::onednn_linear``), one GEMM op where a CUDA path that runs the GELU as its own kernel launches two:
the CPU trace of DiTFast's fp32 and bf16 modes then shows 12 fewer GELU kernels per DiT-S/2 forward, and their bytes,
than such a CUDA trace. Under autocast the CPU path uses ``F.linear`` as CUDA does. Attention kernels differ by device
too (SDPA's CPU flash kernel against cuDNN / flash / efficient on CUDA); each is one launch either way.

Roofline (``--gpu``, default: the CUDA device when there is one, else H100 and H200 from ``dit_fast.utils.hardware``):
with the GPU's peak bandwidth B and peak flops P(dtype), the memory-bound lower bound is bytes / B (all bytes, and
the non-GEMM part), the compute lower bound is GEMM flops / P, and the **roofline PREDICTION** is the sum over the
traced kernels of max(bytes_k / B, flops_k / P(dtype_k)): what the forward would take if every kernel ran at the
roof and launches cost nothing. It is a prediction from peak numbers, never a measurement (the benchmark suite
measures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.common import build_model
from benchmarks.report import traffic_section

IMPLS: dict[str, str] = {
    "reference": "dit_fast.reference.DiT (plain PyTorch)",
    "dit_fast-triton": "DiTFast, Triton kernels (the Triton interpreter on a CPU)",
    "dit_fast-torch": "DiTFast, plain-PyTorch kernels (eager)",
}
MODES: dict[str, str] = {
    "fp32": "fp32 weights and activations",
    "bf16": "bf16 weights and input (model.to(torch.bfloat16))",
    "autocast": "fp32 weights under torch.autocast(dtype=torch.bfloat16)",
}
DEFAULT_GPUS = ("H100", "H200")

# Allocations: no kernel, no bytes.
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_"}
# Views the schema does not mark as aliases.
_EXTRA_VIEWS = {"_unsafe_view"}
# Gathers: their source (argument 0) is read only where indexed, at most as many elements as they write.
_GATHERS = {"embedding", "index_select", "gather", "index"}
# In-place ops that write their target without reading it.
_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "exponential_", "bernoulli_"}
_SDPA_OPS = {
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "scaled_dot_product_attention",
}
_BLHD_ATTENTION_OPS = {"_flash_attention_forward", "_efficient_attention_forward"}  # (B, T, H, hd) layout
_ATTENTION_NAMESPACES = ("flash_attn", "flash_attn_3", "xformers", "xformers_flash")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _mm_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    """2 * M * N * K of (..., M, K) @ (..., K, N), batch dims taken from ``a``."""
    return 2 * _numel(a.shape) * int(b.shape[-1])


def _linear_flops(x: torch.Tensor, weight: torch.Tensor) -> int:
    """x (..., K) @ weight (N, K)^T: 2 * (numel(x) / K) * N * K."""
    return 2 * _numel(x.shape) * int(weight.shape[0])


def _conv_flops(args: Sequence[Any], out: torch.Tensor) -> int:
    """Each output element of a convolution is (C_in / groups) * prod(kernel) multiply-adds."""
    weight = args[1]
    return 2 * _numel(out.shape) * _numel(weight.shape[1:])


def _attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_dim: int) -> int:
    """QK^T and AV: 2 * (rows of q) * S * (hd + hd_v), S the key length along ``seq_dim``."""
    rows = _numel(q.shape) // int(q.shape[-1])
    return 2 * rows * int(k.shape[seq_dim]) * (int(q.shape[-1]) + int(v.shape[-1]))


def gemm_flops(func: torch._ops.OpOverload, args: Sequence[Any], out: Any) -> int | None:
    """Flops (2 x multiply-adds) of ``func`` when it is a GEMM or an attention op (see the module docstring), else
    None."""
    namespace, name = func.namespace, func._opname
    if namespace == "aten":
        if name == "mm":
            return _mm_flops(args[0], args[1])
        if name in ("addmm", "_addmm_activation", "baddbmm"):
            return _mm_flops(args[1], args[2])
        if name == "bmm":
            return _mm_flops(args[0], args[1])
        if name == "linear":
            return _linear_flops(args[0], args[1])
        if name in ("convolution", "_convolution"):
            return _conv_flops(args, out)
        if name in _SDPA_OPS:
            return _attention_flops(args[0], args[1], args[2], seq_dim=-2)
        if name in _BLHD_ATTENTION_OPS:
            return _attention_flops(args[0], args[1], args[2], seq_dim=1)
        return None
    if (namespace, name) in (("dit_fast", "onednn_linear"), ("mkldnn", "_linear_pointwise")):
        return _linear_flops(args[0], args[1])
    if namespace in _ATTENTION_NAMESPACES and ("fwd" in name or "forward" in name):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(tensors) >= 3 and tensors[0].dim() == 4:
            return _attention_flops(*tensors[:3], seq_dim=1)
    return None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements ``t`` spans, a broadcast (stride-0) dimension read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= int(size)
    return n * t.element_size()


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _distinct(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[tuple[Any, ...], torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(_key(t), t)
    return list(seen.values())


@dataclass(frozen=True)
class Kernel:
    """One traced kernel: the op (``aten.add.Tensor``), its class ("gemm", "weight_cast" or "other"), the bytes it
    reads and writes, its GEMM flops (0 unless a GEMM) and the dtype of its first floating input (for the peaks)."""

    op: str
    kind: str
    bytes: int
    flops: int
    dtype: torch.dtype | None


class DispatchTrace(TorchDispatchMode):
    """Records a ``Kernel`` for every non-free op dispatched while active (see the module docstring's rules).

    ``inputs``: the forward's input tensors (their casts are not weight casts). Storages written by traced kernels
    are remembered, so a cast of anything else (state that existed before the trace) is a weight cast.
    """

    def __init__(self, inputs: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.kernels: list[Kernel] = []
        self._inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self._produced: set[int] = set()

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> None:
        name = func._opname
        if func.is_view or name in _EXTRA_VIEWS or name in _ALLOCATIONS:
            return
        written = {_key(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        if name in _WRITE_ONLY or "out" in kwargs:
            reads = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and _key(t) not in written]
        else:
            reads = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        writes = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        read_bytes = {_key(t): tensor_bytes(t) for t in _distinct(reads)}
        if name in _GATHERS and isinstance(args[0], torch.Tensor) and writes:
            source = args[0]
            read_bytes[_key(source)] = min(read_bytes[_key(source)], writes[0].numel() * source.element_size())
        nbytes = sum(read_bytes.values()) + sum(tensor_bytes(t) for t in _distinct(writes))
        dtype = next((t.dtype for t in reads if t.is_floating_point()), None)
        flops = gemm_flops(func, args, out)
        if flops is not None:
            kind = "gemm"
        elif (name == "_to_copy" and reads and writes and reads[0].dtype != writes[0].dtype
              and self._is_state(reads[0])):
            kind = "weight_cast"
        else:
            kind = "other"
        self.kernels.append(Kernel(f"{func.namespace}.{name}.{func._overloadname}", kind, nbytes, flops or 0, dtype))
        self._produced.update(t.untyped_storage().data_ptr() for t in writes)

    def _is_state(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return ptr not in self._inputs and ptr not in self._produced


@dataclass
class Traffic:
    """What one traced forward of one implementation and mode costs (see the module docstring)."""

    impl: str
    mode: str
    batch: int
    kernels: list[Kernel] = field(repr=False)

    def _sum(self, kind: str, attr: str) -> int:
        return sum(getattr(k, attr) for k in self.kernels if k.kind == kind)

    @property
    def launches(self) -> int:
        return len(self.kernels)

    @property
    def gemm_launches(self) -> int:
        return sum(k.kind == "gemm" for k in self.kernels)

    @property
    def weight_cast_launches(self) -> int:
        return sum(k.kind == "weight_cast" for k in self.kernels)

    @property
    def non_gemm_bytes(self) -> int:
        return self._sum("other", "bytes")

    @property
    def gemm_bytes(self) -> int:
        return self._sum("gemm", "bytes")

    @property
    def weight_cast_bytes(self) -> int:
        return self._sum("weight_cast", "bytes")

    @property
    def gemm_flops(self) -> int:
        return self._sum("gemm", "flops")

    def summary(self) -> dict[str, Any]:
        """The row of the traffic table: totals per forward, bytes (MB) and GFLOP per image."""
        per_image = 1e6 * self.batch
        return {
            "impl": self.impl, "mode": self.mode, "batch": self.batch, "launches": self.launches,
            "gemm_launches": self.gemm_launches, "weight_cast_launches": self.weight_cast_launches,
            "non_gemm_bytes": self.non_gemm_bytes, "gemm_bytes": self.gemm_bytes,
            "weight_cast_bytes": self.weight_cast_bytes, "gemm_flops": self.gemm_flops,
            "non_gemm_mb_per_image": self.non_gemm_bytes / per_image, "gemm_mb_per_image": self.gemm_bytes / per_image,
            "weight_cast_mb_per_image": self.weight_cast_bytes / per_image,
            "gemm_gflop_per_image": self.gemm_flops / 1e9 / self.batch,
        }

    def breakdown(self) -> list[tuple[str, str, int, int]]:
        """(op, kind, launches, bytes) per op, most bytes first."""
        launches: Counter[tuple[str, str]] = Counter()
        nbytes: defaultdict[tuple[str, str], int] = defaultdict(int)
        for k in self.kernels:
            launches[(k.op, k.kind)] += 1
            nbytes[(k.op, k.kind)] += k.bytes
        return sorted(((op, kind, n, nbytes[(op, kind)]) for (op, kind), n in launches.items()),
                      key=lambda row: (-row[3], row[0]))

    def roofline(self, bandwidth_gbs: float, peak_tflops: dict[torch.dtype, float]) -> dict[str, float | None]:
        """Lower bounds and the roofline PREDICTION (seconds per forward) at ``bandwidth_gbs`` GB/s and the peaks
        (TFLOP/s per operand dtype); ``None`` where a GEMM's dtype has no peak."""
        bandwidth = bandwidth_gbs * 1e9
        total, unknown = 0.0, False
        compute = 0.0
        for k in self.kernels:
            seconds = k.bytes / bandwidth
            if k.flops:
                peak = peak_tflops.get(k.dtype) if k.dtype is not None else None
                if peak:
                    compute += k.flops / (peak * 1e12)
                    seconds = max(seconds, k.flops / (peak * 1e12))
                else:
                    unknown = True
            total += seconds
        all_bytes = self.non_gemm_bytes + self.gemm_bytes + self.weight_cast_bytes
        return {
            "memory_bound_s": all_bytes / bandwidth, "non_gemm_memory_bound_s": self.non_gemm_bytes / bandwidth,
            "compute_bound_s": None if unknown else compute, "roofline_prediction_s": None if unknown else total,
        }


def trace_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, impl: str = "?",
                  mode: str = "fp32") -> Traffic:
    """Trace one inference forward ``model(x, t, y)`` in ``mode`` ("fp32", "bf16": the caller has cast the model and
    ``x``; "autocast": run under bf16 autocast), after one untraced warm-up forward. x (N, C, H, W), t/y (N,)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if mode == "autocast":
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    with torch.no_grad():
        with autocast():
            model(x, t, y)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        with DispatchTrace(inputs=(x, t, y)) as trace, autocast():
            model(x, t, y)
    return Traffic(impl, mode, x.shape[0], trace.kernels)


@contextlib.contextmanager
def _kernels_env(impl: str, device: torch.device) -> Iterator[None]:
    """On a CPU, the Triton kernels run only in the interpreter: set ``TRITON_INTERPRET=1`` for that impl's trace."""
    if impl != "dit_fast-triton" or device.type != "cpu":
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def traced_model(impl: str, config: Any, device: torch.device, mode: str, attention: str = "auto",
                 seed: int = 0) -> nn.Module:
    """``impl`` of ``config`` (a ``DiTConfig``) on ``device`` from the suite's one factory
    (``benchmarks.common.build_model``), bf16 weights for ``mode == "bf16"``; every implementation gets the same
    seeded weights (the paper's init; values do not change what is traced)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    fast = impl != "reference"
    return build_model(config, device, torch.bfloat16 if mode == "bf16" else torch.float32, fast=fast,
                       kernels=impl.removeprefix("dit_fast-") if fast else "auto", attention=attention, seed=seed)


def forward_inputs(config: Any, batch: int, device: torch.device, mode: str, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random x (N, C, H, W) (bf16 in "bf16" mode), t (N,) timesteps, y (N,) labels."""
    gen = torch.Generator().manual_seed(seed)
    h, w = config.grid_input
    x = torch.randn(batch, config.in_channels, h, w, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, config.num_classes, (batch,), generator=gen)
    return x.to(device, torch.bfloat16 if mode == "bf16" else torch.float32), t.to(device), y.to(device)


def measure(config: Any, batch: int, device: torch.device, impls: Sequence[str] = tuple(IMPLS),
            modes: Sequence[str] = tuple(MODES), attention: str = "auto",
            progress: Callable[[str], None] | None = None) -> list[Traffic]:
    """Trace every implementation in every mode (see ``trace_forward``); one ``Traffic`` per pair.

    A ``dit_fast-triton`` trace must contain ``dit_fast::`` kernel ops, else RuntimeError (the Triton kernels did not
    run: Triton missing, or a CPU without the interpreter).
    """
    results = []
    for impl in impls:
        for mode in modes:
            with _kernels_env(impl, device):
                model = traced_model(impl, config, device, mode, attention)
                x, t, y = forward_inputs(config, batch, device, mode)
                traffic = trace_forward(model, x, t, y, impl=impl, mode=mode)
            if impl == "dit_fast-triton" and not any(k.op.startswith("dit_fast.") and "onednn" not in k.op
                                                     for k in traffic.kernels):
                raise RuntimeError("dit_fast-triton ran none of the dit_fast:: Triton ops (is triton installed? on a "
                                   "CPU they run only with TRITON_INTERPRET=1)")
            if progress is not None:
                progress(f"traced {impl} {mode}: {traffic.launches} launches")
            results.append(traffic)
    return results


def gpu_specs(names: str, device: torch.device) -> list[Any]:
    """The ``dit_fast.utils.hardware.GPUSpec`` s for ``--gpu``: "auto" (the CUDA device if there is one, else H100 and
    H200), "none", or comma-separated names. ValueError for an unknown name."""
    if names == "none":
        return []
    from dit_fast.utils import hardware

    if names == "auto":
        if device.type == "cuda":
            spec = hardware.gpu_spec(device)
            return [spec] if spec is not None else []
        wanted: Sequence[str] = DEFAULT_GPUS
    else:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
    specs = []
    for name in wanted:
        spec = hardware.gpu_spec(name)
        if spec is None:
            raise ValueError(f"--gpu: no peak numbers for {name!r} in dit_fast.utils.hardware")
        specs.append(spec)
    return specs


def matmul_peaks(spec: Any) -> dict[torch.dtype, float]:
    """A ``GPUSpec`` 's GEMM peaks (TFLOP/s) per operand dtype; fp32 at the TF32 tensor-core peak when
    ``torch.backends.cuda.matmul.allow_tf32`` is on (as ``dit_fast.utils.hardware.peak_flops`` reads it), else plain
    FP32."""
    peaks = dict(spec.peak_tflops)
    tf32 = getattr(spec, "tf32_tflops", None)
    if torch.backends.cuda.matmul.allow_tf32 and tf32 and torch.float32 in peaks:
        peaks[torch.float32] = tf32
    return peaks


def results_dict(config_name: str, device: torch.device, attention: str, traffics: Sequence[Traffic],
                 specs: Sequence[Any] = ()) -> dict[str, Any]:
    """The JSON-able result: the setup, one row per (impl, mode) with ratios to the reference in the same mode,
    and the roofline rows per GPU in ``specs``."""
    rows = [tr.summary() for tr in traffics]
    reference = {r["mode"]: r for r in rows if r["impl"] == "reference"}
    for r in rows:
        base = reference.get(r["mode"])
        if base is not None:
            for key, total in (("non_gemm_vs_reference", "non_gemm_bytes"), ("launches_vs_reference", "launches")):
                r[key] = r[total] / base[total] if base[total] else None
    roofline = []
    for spec in specs:
        for tr in traffics:
            roofline.append({"gpu": spec.name, "bandwidth_gbs": spec.bandwidth_gbs, "impl": tr.impl, "mode": tr.mode,
                             **tr.roofline(spec.bandwidth_gbs, matmul_peaks(spec))})
    batch = traffics[0].batch if traffics else None
    return {"config": config_name, "batch": batch, "device": str(device), "attention": attention,
            "torch": torch.__version__, "rows": rows, "roofline": roofline}


def format_breakdown(traffic: Traffic, top: int = 15) -> list[str]:
    """The ``top`` ops of one trace by bytes, as a Markdown table."""
    lines = [f"### {traffic.impl}, {traffic.mode}: top ops by bytes", "", "| op | class | launches | MB/img |",
             "|---|---|---|---|"]
    for op, kind, n, nbytes in traffic.breakdown()[:top]:
        lines.append(f"| `{op}` | {kind} | {n} | {nbytes / 1e6 / traffic.batch:.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="DiT-S/2", help="model config (default DiT-S/2)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, from: " + "; ".join(
        f"{name}: {what}" for name, what in IMPLS.items()) + " (default all)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + "; ".join(
        f"{name}: {what}" for name, what in MODES.items()) + " (default all)")
    parser.add_argument("--attention", default="auto", help="DiTFast's attention backend (default auto)")
    parser.add_argument("--gpu", default="auto",
                        help="roofline PREDICTION for these GPUs (dit_fast.utils.hardware names, comma-separated), "
                             "'auto' (the CUDA device, else H100,H200) or 'none'")
    parser.add_argument("--breakdown", action="store_true", help="also print each trace's top ops by bytes")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON (for benchmarks.report)")
    args = parser.parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for value, known, option in ((impls, IMPLS, "--impls"), (modes, MODES, "--modes")):
        unknown = [v for v in value if v not in known]
        if unknown or not value:
            parser.error(f"{option}: unknown or empty {unknown}; choose from {', '.join(known)}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if device.type == "cpu" and "dit_fast-triton" in impls and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its own helpers in interpreter flavour
    from dit_fast.models.config import get_config

    try:
        config = get_config(args.config)
    except ValueError as e:
        parser.error(f"--config: {e}")
    try:
        specs = gpu_specs(args.gpu, device)
    except ImportError as e:
        specs = []
        print(f"no roofline: dit_fast.utils.hardware is not importable ({e})")
    except ValueError as e:
        parser.error(str(e))
    traffics = measure(config, args.batch, device, impls, modes, args.attention,
                       progress=lambda msg: print(msg, flush=True))
    result = results_dict(args.config, device, args.attention, traffics, specs)
    print()
    print("\n".join(traffic_section(result)))
    if args.breakdown:
        for tr in traffics:
            print("\n".join(["", *format_breakdown(tr)]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"traffic": result}, indent=2), encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
