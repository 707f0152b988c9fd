"""Turn a pytest-benchmark JSON run of the dit-fast suite into a Markdown report and a scaling plot.

    python -m benchmarks.report RUN.json                    # writes RUN.md and RUN.png next to it
    python -m benchmarks.report RUN.json --markdown out.md --plot out.png
    python -m benchmarks.report A.json B.json --merged ALL.json   # several runs (levels) in one report: ALL.md/png
    python -m benchmarks.report RUN.json T.json --merged ALL.json  # + the traffic section (benchmarks.traffic --json)

(``pytest benchmarks/ --benchmark-only --benchmark-json=RUN.json`` writes both by itself at the end of the run.)

The report names the machine (CPU, GPU, driver, torch/triton versions, date, commit), then one table per benchmark
group: per case and implementation the median time, images/s, achieved GFLOP/s, speed-up against the plain
reference and the compiled reference of the same case, fraction of the matmul ceiling measured in the same run
(and MFU on a GPU), and the parity error against the fp32 reference with its bound. A summary table gives DiTFast's
speed-ups, and the plot shows achieved GFLOP/s against each model's Gflops for the scaling sweep, one line per
implementation. The plot needs matplotlib; without it the report is Markdown only, with a note saying so. A run
that carries a traffic result (merged from ``python -m benchmarks.traffic --json``) gets its section: traffic, GEMM
work and launches per forward, and the roofline PREDICTION.

The report reads the ``extra_info`` keys documented in ``benchmarks/common.py``; cases that lack some (a new
benchmark file) still get a row, with "-" where a value is unknown.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.impls import BASELINES, FAST_IMPLS
from benchmarks.impls import IMPLS as IMPL_ORDER  # table order; this module stays importable without torch

CEILING_IMPL = "matmul"


@dataclass
class Row:
    """One benchmark case of a run, as the report shows it."""

    group: str
    case: str
    impl: str
    median_s: float
    images_per_s: float | None = None
    gflops: float | None = None
    gbps: float | None = None
    frac_ceiling: float | None = None
    mfu: float | None = None
    mfu_datasheet: float | None = None
    max_rel_err: float | None = None
    tolerance: float | None = None
    parity_ok: bool | None = None
    model: str | None = None
    model_gflops: float | None = None
    speedups: dict[str, float] = field(default_factory=dict)  # baseline impl -> baseline median / this median


def _case_key(bench: dict[str, Any], impl: str) -> str:
    extra = bench.get("extra_info") or {}
    if extra.get("case"):
        return str(extra["case"])
    params = bench.get("params") or {}
    others = [f"{k}={v}" for k, v in params.items() if k != "impl" and v != impl]
    return ", ".join(others) or str(bench.get("name", "?")).split("[")[0]


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _parity_ok(extra: dict[str, Any]) -> bool | None:
    if isinstance(extra.get("parity_ok"), bool):
        return extra["parity_ok"]
    err, tol = _float(extra.get("max_rel_err")), _float(extra.get("tolerance"))
    return None if err is None or tol is None else err <= tol


def load_rows(run: dict[str, Any]) -> list[Row]:
    """The run's benchmarks as ``Row`` s, with speed-ups against the baselines of the same group and case."""
    rows = []
    for bench in run.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        params = bench.get("params") or {}
        impl = str(extra.get("impl") or params.get("impl") or bench.get("name", "?"))
        # a case whose round is not one call (e.g. one triton.testing.do_bench) records its own time per call
        median = _float(extra.get("seconds")) or float(bench["stats"]["median"])
        gflop = _float(extra.get("gflop"))
        images = _float(extra.get("images"))
        rows.append(Row(
            group=str(bench.get("group") or "ungrouped"),
            case=_case_key(bench, impl),
            impl=impl,
            median_s=median,
            images_per_s=_float(extra.get("images_per_s")) or (images / median if images and median else None),
            gflops=_float(extra.get("gflops")) or (gflop / median if gflop and median else None),
            gbps=_float(extra.get("gbps")),
            frac_ceiling=_float(extra.get("frac_ceiling")),
            mfu=_float(extra.get("mfu")),
            mfu_datasheet=_float(extra.get("mfu_datasheet")),
            max_rel_err=_float(extra.get("max_rel_err")),
            tolerance=_float(extra.get("tolerance")),
            parity_ok=_parity_ok(extra),
            model=extra.get("model"),
            model_gflops=_float(extra.get("model_gflops")),
        ))
    medians = {(r.group, r.case, r.impl): r.median_s for r in rows}
    for r in rows:
        for base in (*BASELINES, "diffusers"):
            base_median = medians.get((r.group, r.case, base))
            if base_median and r.median_s > 0:
                r.speedups[base] = base_median / r.median_s
    return rows


def _impl_rank(impl: str) -> tuple[int, str]:
    return (IMPL_ORDER.index(impl), impl) if impl in IMPL_ORDER else (len(IMPL_ORDER), impl)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:{spec}}{suffix}"


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _fmt_parity(r: Row) -> str:
    if r.max_rel_err is None:
        return "-"
    text = f"{r.max_rel_err:.1e}"
    if r.tolerance is not None:
        text += f" (<= {r.tolerance:.0e})"
    if r.parity_ok is False:
        text += " **FAIL**"
    return text


def _header(run: dict[str, Any]) -> list[str]:
    machine = run.get("machine_info") or {}
    env = machine.get("dit_fast") or {}
    commit = run.get("commit_info") or {}
    lines = ["# dit-fast benchmark report", ""]
    cpu = env.get("cpu_model") or (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "?"
    cores = env.get("cpu_count")
    if machine:  # a traffic result alone names no machine: its section names the device it traced on
        lines.append(f"- CPU: {cpu}" + (f", {cores} cores" if cores else "")
                     + (f" ({env['torch_threads']} torch threads)" if env.get("torch_threads") else ""))
    if env.get("gpu"):
        lines.append(f"- GPU: {env['gpu']}, driver {env.get('driver') or '?'}, CUDA {env.get('cuda') or '?'}")
    versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "triton", "diffusers") if env.get(name))
    if versions:
        lines.append(f"- Software: Python {machine.get('python_version', '?')}, {versions}")
    if env.get("bench_device"):
        lines.append(f"- Benchmarked on: {env['bench_device']}, dtype {env.get('dtype', '?')}")
    if run.get("datetime"):
        lines.append(f"- Date: {run['datetime']}")
    if commit.get("id"):
        dirty = " (with uncommitted changes)" if commit.get("dirty") else ""
        lines.append(f"- Commit: {str(commit['id'])[:12]}{dirty}")
    return lines


def _shared_ceiling(run: dict[str, Any]) -> float | None:
    """The ceiling every case's fractions divide by (``ceiling_gflops``; the first, if runs were merged)."""
    for bench in run.get("benchmarks", []):
        value = _float((bench.get("extra_info") or {}).get("ceiling_gflops"))
        if value:
            return value
    return None


def _ceiling_lines(run: dict[str, Any], rows: list[Row]) -> list[str]:
    lines = []
    shared = _shared_ceiling(run)
    if shared:
        lines.append(f"GEMM ceiling: {shared:,.1f} GFLOP/s, the fastest route (torch.matmul, F.linear, oneDNN) over "
                     "the model's linear shapes in the run's dtype, timed at its start; every \"of ceiling\" and MFU "
                     "column divides by it.")
    for r in (r for r in rows if r.impl == CEILING_IMPL):
        lines.append(f"The ceiling case ({r.case}) timed by pytest-benchmark: {_fmt(r.gflops, ',.1f')} GFLOP/s at the "
                     "median" + (f", {_fmt(r.mfu_datasheet, '.0%')} of the datasheet peak" if r.mfu_datasheet else "")
                     + ".")
    return lines


def _group_table(rows: list[Row]) -> list[str]:
    gpu = any(r.mfu is not None for r in rows)
    datasheet = any(r.mfu_datasheet is not None for r in rows)
    bandwidth = any(r.gbps is not None for r in rows)
    head = ["case", "impl", "median", "images/s", "GFLOP/s", *(["GB/s"] if bandwidth else []), "x reference",
            "x reference+compile", "of ceiling"]
    if gpu:
        head.append("MFU")
    if datasheet:
        head.append("MFU (datasheet)")
    head.append("max_rel_err")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cases = list(dict.fromkeys(r.case for r in rows))
    for case in cases:
        for r in sorted((r for r in rows if r.case == case), key=lambda r: _impl_rank(r.impl)):
            cells = [case, r.impl, _fmt_time(r.median_s), _fmt(r.images_per_s, ".3g"), _fmt(r.gflops, ",.1f"),
                     *([_fmt(r.gbps, ",.1f")] if bandwidth else []), _fmt(r.speedups.get("reference"), ".2f", "x"),
                     _fmt(r.speedups.get("reference+compile"), ".2f", "x"), _fmt(r.frac_ceiling, ".1%")]
            if gpu:
                cells.append(_fmt(r.mfu, ".1%"))
            if datasheet:
                cells.append(_fmt(r.mfu_datasheet, ".1%"))
            cells.append(_fmt_parity(r))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _summary_table(rows: list[Row]) -> list[str]:
    """Per case with a DiTFast row: the fastest DiTFast variant's speed-up against each other implementation."""
    lines = []
    for group in dict.fromkeys(r.group for r in rows):
        for case in dict.fromkeys(r.case for r in rows if r.group == group):
            fast = [r for r in rows if r.group == group and r.case == case and r.impl in FAST_IMPLS]
            if not fast:
                continue
            best = min(fast, key=lambda r: r.median_s)
            ratios = [_fmt(best.speedups.get(base), ".2f", "x") for base in (*BASELINES, "diffusers")]
            lines.append("| " + " | ".join([group, case, best.impl, *ratios, _fmt(best.frac_ceiling, ".1%")]) + " |")
    if not lines:
        return []
    head = ["group", "case", "fastest dit_fast", "x reference", "x reference+compile", "x diffusers", "of ceiling"]
    return ["## Summary: DiTFast speed-ups", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines, ""]


def _fmt_us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f} us"


def traffic_section(traffic: dict[str, Any]) -> list[str]:
    """Markdown of a ``python -m benchmarks.traffic`` result (its ``--json`` file's "traffic" entry): the traffic
    and launch table, then the roofline PREDICTION per GPU when it has one."""
    lines = [
        f"## Traffic and launches per forward ({traffic.get('config', '?')}, batch {traffic.get('batch', '?')})", "",
        f"Dispatch-level trace of one inference forward on {traffic.get('device', '?')} (torch "
        f"{traffic.get('torch', '?')}, attention {traffic.get('attention', '?')}) by `python -m benchmarks.traffic`: "
        "one dispatched op = one kernel launch, bytes = its distinct tensor inputs + outputs, views free; GEMMs and "
        "attention counted as GEMM flops with their operand bytes apart; weight casts apart. Ratios are against the "
        "reference in the same mode.", "",
    ]
    head = ["impl", "mode", "launches", "GEMM launches", "weight-cast launches", "non-GEMM MB/img", "x reference",
            "launches x reference", "GEMM operand MB/img", "weight-cast MB/img", "GEMM GFLOP/img"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in traffic.get("rows", []):
        lines.append("| " + " | ".join([
            str(r["impl"]), str(r["mode"]), str(r["launches"]), str(r["gemm_launches"]),
            str(r["weight_cast_launches"]), _fmt(_float(r.get("non_gemm_mb_per_image")), ".2f"),
            _fmt(_float(r.get("non_gemm_vs_reference")), ".2f", "x"),
            _fmt(_float(r.get("launches_vs_reference")), ".2f", "x"), _fmt(_float(r.get("gemm_mb_per_image")), ".2f"),
            _fmt(_float(r.get("weight_cast_mb_per_image")), ".2f"), _fmt(_float(r.get("gemm_gflop_per_image")), ".3f"),
        ]) + " |")
    roofline = traffic.get("roofline") or []
    if roofline:
        lines += [
            "", "### Roofline: a PREDICTION from peak numbers, not a measurement", "",
            "Per forward, at the GPU's peak bandwidth and peak flops (`dit_fast.utils.hardware`): memory-bound lower "
            "bound = all traced bytes / bandwidth (and the non-GEMM bytes alone); compute bound = GEMM flops / peak; "
            "PREDICTION = sum over kernels of max(bytes / bandwidth, flops / peak), launch latency not included.", "",
        ]
        head = ["GPU", "impl", "mode", "memory-bound lower bound", "non-GEMM part", "compute bound",
                "roofline PREDICTION"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in roofline:
            lines.append("| " + " | ".join([
                f"{r['gpu']} ({r['bandwidth_gbs']:,.0f} GB/s)", str(r["impl"]), str(r["mode"]),
                _fmt_us(_float(r.get("memory_bound_s"))), _fmt_us(_float(r.get("non_gemm_memory_bound_s"))),
                _fmt_us(_float(r.get("compute_bound_s"))), _fmt_us(_float(r.get("roofline_prediction_s"))),
            ]) + " |")
    return lines + [""]


def markdown_report(run: dict[str, Any], plot_name: str | None = None, plot_note: str | None = None) -> str:
    """The whole report as Markdown; ``plot_name`` (relative path) embeds the plot, ``plot_note`` explains its
    absence."""
    rows = load_rows(run)
    lines = _header(run) + [""]
    if rows:
        lines += _ceiling_lines(run, rows)
        lines += ["", "Speed-up columns: the baseline's median time / this row's (same group and case; > 1 is "
                  "faster). max_rel_err: max|out - ref| / max|ref| against the fp32 plain reference on the same "
                  "inputs, with the bound the case is held to.", ""]
    lines += _summary_table(rows)
    for group in dict.fromkeys(r.group for r in rows):
        lines += [f"## {group}", ""] + _group_table([r for r in rows if r.group == group]) + [""]
    if run.get("traffic"):
        lines += traffic_section(run["traffic"])
    failed = [r for r in rows if r.parity_ok is False]
    if failed:
        lines += ["## Parity failures", ""] + [f"- {r.group} / {r.case} / {r.impl}: max_rel_err "
                                                f"{r.max_rel_err:.3g} > {r.tolerance:.3g}" for r in failed] + [""]
    if plot_name:
        lines += ["## Scaling", "", f"![achieved GFLOP/s against model Gflops]({plot_name})", ""]
    elif plot_note:
        lines += ["## Scaling", "", plot_note, ""]
    return "\n".join(lines)


def scaling_rows(rows: list[Row]) -> list[Row]:
    """Rows of the scaling sweep (groups named "scaling..."), those with a model cost."""
    return [r for r in rows if r.group.startswith("scaling") and r.model_gflops and r.gflops]


def plot_scaling(rows: list[Row], path: Path, ceiling_gflops: float | None = None, title: str = "") -> bool:
    """Achieved GFLOP/s against each model's Gflops (log x), one line per implementation, the matmul ceiling as
    a dashed line. Returns False, writing nothing, when matplotlib is missing or there is nothing to plot."""
    points = scaling_rows(rows)
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in sorted({r.impl for r in points}, key=_impl_rank):
        series = sorted((r for r in points if r.impl == impl), key=lambda r: r.model_gflops)
        ax.plot([r.model_gflops for r in series], [r.gflops for r in series], marker="o", label=impl)
        if impl == BASELINES[0]:
            for r in series:
                ax.annotate(r.model or r.case, (r.model_gflops, r.gflops), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
    if ceiling_gflops:
        ax.axhline(ceiling_gflops, linestyle="--", color="gray", label=f"matmul ceiling ({ceiling_gflops:,.0f})")
    ax.set_xscale("log")  # model cost spans decades (0.36 to 119 Gflops at 256 px); throughput is read linearly
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.1 * max([ceiling_gflops or 0.0, *(r.gflops for r in points)]))
    ax.set_xlabel("model Gflops per image (paper convention: multiply-add = 1)")
    ax.set_ylabel("achieved GFLOP/s (hardware: 2 x multiply-adds)")
    ax.set_title(title or "DiT forward: achieved throughput against model cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(json_path: Path, markdown_path: Path | None = None,
                 plot_path: Path | None = None) -> tuple[Path, Path | None]:
    """Read ``json_path``; write the Markdown (default: same name, ``.md``) and the plot (``.png``).

    Returns (markdown path, plot path or None when no plot was drawn).
    """
    run = json.loads(Path(json_path).read_text(encoding="utf-8"))
    markdown_path = markdown_path or Path(json_path).with_suffix(".md")
    plot_path = plot_path or Path(json_path).with_suffix(".png")
    rows = load_rows(run)
    device = ((run.get("machine_info") or {}).get("dit_fast") or {})
    title = f"DiT forward on {device.get('gpu') or device.get('cpu_model') or 'this machine'}"
    drawn = plot_scaling(rows, plot_path, _shared_ceiling(run), title)
    note = None
    if not drawn and rows:
        note = ("No plot: matplotlib is not installed (pip install matplotlib)." if scaling_rows(rows)
                else "No plot: this run has no scaling cases.")
    if drawn:
        try:
            plot_ref = str(plot_path.relative_to(markdown_path.parent))
        except ValueError:
            plot_ref = str(plot_path.resolve())
    else:
        plot_ref = None
    markdown_path.write_text(markdown_report(run, plot_ref, note), encoding="utf-8")
    return markdown_path, plot_path if drawn else None


def merge_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run holding every run's benchmarks (machine, commit and date of the first run that has benchmarks) and
    the last traffic result (``python -m benchmarks.traffic --json``) among them."""
    merged = dict(next((run for run in runs if run.get("benchmarks")), runs[0]))
    merged["benchmarks"] = [bench for run in runs for bench in run.get("benchmarks", [])]
    traffic = [run["traffic"] for run in runs if run.get("traffic")]
    if traffic:
        merged["traffic"] = traffic[-1]
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+",
                        help="pytest-benchmark JSON file(s) (--benchmark-json=RUN.json), and optionally a traffic "
                             "result (python -m benchmarks.traffic --json T.json); several need --merged")
    parser.add_argument("--merged", type=Path, default=None,
                        help="write the inputs' benchmarks merged into this JSON and report on it (e.g. one file per "
                             "benchmark level, as benchmarks/gpu_check.sh runs them)")
    parser.add_argument("--markdown", type=Path, default=None, help="output Markdown (default: RUN.md)")
    parser.add_argument("--plot", type=Path, default=None, help="output PNG (default: RUN.png)")
    args = parser.parse_args(argv)
    if len(args.json) > 1 and args.merged is None:
        parser.error("several JSON files need --merged OUT.json")
    runs = []
    for path in args.json:
        if not path.is_file():
            parser.error(f"{path}: no such file")
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            parser.error(f"{path} is not JSON ({e})")
        if not isinstance(run, dict) or not (isinstance(run.get("benchmarks"), list)
                                             or isinstance(run.get("traffic"), dict)):
            parser.error(f"{path} is not a pytest-benchmark JSON run (no 'benchmarks' list), nor a "
                         "`python -m benchmarks.traffic --json` result (no 'traffic' entry)")
        run.setdefault("benchmarks", [])
        runs.append(run)
    source = args.json[0]
    if args.merged is not None:
        args.merged.parent.mkdir(parents=True, exist_ok=True)
        args.merged.write_text(json.dumps(merge_runs(runs), indent=2), encoding="utf-8")
        source = args.merged
    try:
        markdown, plot = write_report(source, args.markdown, args.plot)
    except (KeyError, TypeError, ValueError) as e:
        parser.error(f"{source}: a benchmark entry lacks what the report needs ({type(e).__name__}: {e})")
    print(f"wrote {markdown}" + (f" and {plot}" if plot else " (no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
