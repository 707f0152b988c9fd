"""Where a benchmark case's time goes: a ``torch.profiler`` summary per case, and its Markdown rendering.

``profile_summary(fn, device)`` runs ``fn`` a few times under the profiler and sums, per kernel, the device time (on a
GPU: every CUDA kernel, memcpy and memset; on a CPU: each op's self time), then sorts every kernel into one of
``CATEGORIES`` by its name (``classify``): GEMMs (cuBLAS/cuBLASLt/CUTLASS, ``aten::mm``/``addmm``, convolutions,
FP8 ``_scaled_mm``), attention (flash/cuDNN/memory-efficient SDPA, softmax), row ops (LayerNorms, the fused row and
patch kernels, reductions), copies (memcpy/memset, ``copy_``, ``cat``, layout changes) and elementwise (the rest of the
pointwise work: GELU, adds, the optimizer's foreach kernels, inductor's pointwise kernels). The benchmark levels store
the summary in ``extra_info["profile"]`` when run with ``--dit-profile``; ``python -m benchmarks.profiling RUN.json
...`` prints, per case, the MFU against the run's measured matmul ceiling and against the datasheet next to the
category shares and the top kernels, which is what explains an MFU figure (a forward at 50% MFU with 75% of its time
in GEMMs running at 70% of the ceiling, and 25% in row ops, has its answer in the table).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

CATEGORIES = ("gemm", "attention", "row-op", "copy", "elementwise", "other")

# First match wins: attention before GEMM (attention kernels run GEMMs inside), copies before elementwise (PyTorch's
# copy kernels are "vectorized_elementwise_kernel<..., direct_copy_kernel_cuda>").
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((category, re.compile(pattern, re.IGNORECASE)) for
                                                        category, pattern in (
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|softmax|mha"),
    ("gemm", r"gemm|cutlass|cublas|xmma|nvjet|sm\d+_.*(?:hmma|gmma|mma)|_scaled_mm|aten::(?:mm|addmm|bmm|baddbmm|"
             r"matmul|linear|_addmm_activation)\b|conv|implicit|wgrad|dgrad|mkldnn|onednn"),
    ("row-op", r"_row_(?:fwd|bwd)_kernel|_patch_kernel|layer_?norm|group_?norm|rms_?norm|welford|triton_(?:per|red)_|"
               r"reduce|aten::(?:sum|mean|var|std|norm)\b"),
    ("copy", r"memcpy|memset|copy|aten::(?:to|_to_copy|cat|contiguous|clone|fill_|zero_|index|gather|scatter|"
             r"stack|pad|constant_pad_nd|unfold|im2col|col2im)\b|cat_|catarray|fill"),
    ("elementwise", r"elementwise|pointwise|triton_poi_|gelu|silu|tanh|foreach|adam|lerp|aten::\w+"),
))


def classify(name: str) -> str:
    """The category (one of ``CATEGORIES``) of a kernel or op name."""
    return next((category for category, rule in _RULES if rule.search(name)), "other")


def summarize(events: Iterable[tuple[str, float, int]], steps: int = 1, top: int = 10) -> dict[str, Any]:
    """Per-step summary of ``(name, microseconds, calls)`` events (names may repeat; they are summed).

    Returns ``{"total_ms", "shares": {category: fraction of the total}, "top": [{"name", "category", "ms", "share",
    "calls"}]}`` with times per step (divided by ``steps``), ``top`` kernels by time, every category in ``shares``.
    """
    totals: dict[str, list[float]] = {}
    for name, us, calls in events:
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += calls
    total_us = sum(us for us, _ in totals.values())
    shares = dict.fromkeys(CATEGORIES, 0.0)
    for name, (us, _) in totals.items():
        shares[classify(name)] += us / total_us if total_us else 0.0
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return {
        "total_ms": total_us / 1e3 / steps,
        "shares": shares,
        "top": [{"name": name, "category": classify(name), "ms": us / 1e3 / steps,
                 "share": us / total_us if total_us else 0.0, "calls": calls // steps}
                for name, (us, calls) in ranked],
    }


def profiled_events(prof: torch.profiler.profile, device: torch.device) -> list[tuple[str, float, int]]:
    """``(name, microseconds, calls)`` of a finished profile: device kernels on CUDA, ops' self CPU time on a CPU."""
    events = []
    for avg in prof.key_averages():
        if device.type == "cuda":
            us = getattr(avg, "self_device_time_total", None)
            if us is None:  # torch < 2.4
                us = avg.self_cuda_time_total
            if avg.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = avg.self_cpu_time_total
        if us > 0:
            events.append((avg.key, float(us), int(avg.count)))
    return events


def profile_summary(fn: Callable[[], Any], device: torch.device, steps: int = 2, top: int = 10) -> dict[str, Any]:
    """Run ``fn`` ``steps`` times under ``torch.profiler`` on ``device`` (already warmed up) and summarize it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return summarize(profiled_events(prof, device), steps, top)


def render(benchmarks: Sequence[dict[str, Any]]) -> str:
    """Markdown: per profiled case its MFU (measured ceiling and datasheet), the category shares, the top kernels."""
    lines = ["# Where the time goes (torch.profiler, per case)", ""]
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        profile = info.get("profile")
        if not profile:
            continue
        mfu = info.get("mfu", info.get("frac_ceiling"))
        mfu_text = "n/a" if mfu is None else f"{mfu:.1%}"
        datasheet = info.get("mfu_datasheet")
        lines += [f"## {info.get('case', bench.get('name'))}: {info.get('impl', '?')}", "",
                  f"MFU {mfu_text} of the measured matmul ceiling ({info.get('ceiling_gflops', 0):.0f} GFLOP/s), "
                  + ("n/a" if datasheet is None else f"{datasheet:.1%}") + " of the datasheet peak; "
                  f"profiled {profile['total_ms']:.2f} ms per call", "",
                  "| " + " | ".join(CATEGORIES) + " |", "|" + "---|" * len(CATEGORIES),
                  "| " + " | ".join(f"{profile['shares'].get(c, 0.0):.1%}" for c in CATEGORIES) + " |", "",
                  "| kernel | category | ms/call | share | calls |", "|---|---|---|---|---|"]
        for row in profile["top"]:
            name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
            name = name.replace("|", "\\|")
            lines.append(f"| `{name}` | {row['category']} | {row['ms']:.3f} | {row['share']:.1%} | {row['calls']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling",
                                     description="Print the profiler summaries stored in pytest-benchmark JSON runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="pytest-benchmark JSON files")
    args = parser.parse_args(argv)
    benchmarks = [b for path in args.runs if path.is_file() for b in json.loads(path.read_text())["benchmarks"]]
    print(render(benchmarks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
