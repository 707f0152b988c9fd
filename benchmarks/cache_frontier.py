"""Speed-quality frontier of step caching on a trained digits DiT: ``python -m benchmarks.cache_frontier --ckpt CKPT``.

Samples the model (``dit-fast train``'s built-in digits DiT, or any pixel-space digits checkpoint) with every cache
policy of ``--policies`` under each sampler of ``--samplers`` (default DDPM-250 and DPM-Solver++-20), unguided
and with guidance ``--cfg-scale`` (default 2.0, all eps channels), ``--samples`` images (default 1,000, the classes
cycling, one batch, the same seeds for every policy), and scores each run with
``dit_fast.sampling.metrics.evaluate_digits``: class accuracy (an SVM trained on real digits) and the Fréchet distance
to the real digits in PCA features. It trains nothing. Written next to ``--out`` (default
``benchmarks/results/cache_frontier``):

- ``OUT.md``: the table (full network evaluations, cached steps, wall time, speed-up over no cache, accuracy and
  Fréchet distance, each against no cache) with the command and machine;
- ``OUT.json``: the same rows, machine-readable;
- ``OUT.png``: Fréchet distance and accuracy against the wall-time speed-up, one panel per sampler and guidance
  (needs matplotlib; skipped with a note without it).

With ``--pipeline`` the same model is sampled as a diffusers user would: converted to a ``DiTTransformer2DModel``
(diffusers' numerics) in a ``DiTPipeline`` (diffusers' DDPM / DDIM / DPM-Solver++ schedulers, the learned variance
dropped as the pipeline does, a pass-through decoder for the pixel-space model) served by
``dit_fast.accelerate(pipe, cache=POLICY)``; unguided only (``DiTPipeline`` hard-codes ImageNet's null class 1000).

Wall time (and the process's CPU time) is one whole ``dit_fast.sampling.generate.generate`` (or pipeline) call (noise,
sampling loop, network) on ``--threads`` CPU threads (default 1, as the digits recipe trains), the fastest of repeats
that add up to ``--min-time`` (short runs repeat, so a busy neighbour on a shared machine skews them less); no-cache
runs first in each group, then the policies in order. A "full evaluation" is one network pass with every block
computed (over the doubled batch when guided).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from dit_fast.cache import AUTO_MIN_STEPS, AUTO_SPEC, AUTO_SPEC_FEW_STEPS, parse_cache
from dit_fast.sampling.generate import generate, load_model
from dit_fast.sampling.metrics import evaluate_digits

DEFAULT_POLICIES = ("none", "fora:2", "fora:3", "fora:4", "taylor:4:2", "taylor:6:2", "adaptive:0.15:4",
                    "adaptive:0.2:6")
DEFAULT_SAMPLERS = ("ddpm-250", "dpm++-20")


@dataclass
class FrontierRow:
    """One sampling run and its scores."""

    sampler: str
    cfg_scale: float
    policy: str
    steps: int
    full_evals: int
    cached_steps: int
    seconds: float
    speedup: float
    cpu_seconds: float
    cpu_speedup: float
    accuracy: float
    frechet: float
    accuracy_delta: float
    frechet_ratio: float


def _sampler(spec: str) -> tuple[str, int]:
    """"ddpm-250" -> ("ddpm", 250)."""
    name, _, steps = spec.rpartition("-")
    if name not in ("ddpm", "ddim", "dpm++") or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"sampler {spec!r}: expected NAME-STEPS with NAME ddpm, ddim or dpm++")
    return name, int(steps)


Sampler = Callable[[torch.Tensor, str, int, float, str, int, dict[str, int]], torch.Tensor]


def generate_sampler(model: torch.nn.Module) -> Sampler:
    """``sample(labels, sampler, steps, cfg_scale, policy, seed, stats) -> samples (N, 1, 8, 8)`` with
    ``dit_fast.sample.generate`` (all eps channels guided, x_0 clipped)."""

    def sample(labels: torch.Tensor, sampler: str, steps: int, cfg_scale: float, policy: str, seed: int,
               stats: dict[str, int]) -> torch.Tensor:
        return generate(model, labels, sampler=sampler, num_steps=steps, cfg_scale=cfg_scale, guide_channels="all",
                        seed=seed, batch_size=len(labels), clip_denoised=True, progress=False, cache=policy,
                        cache_stats=stats)

    return sample


class _PixelDecoder(torch.nn.Module):
    """The ``vae`` of a pixel-space ``DiTPipeline``: latents are the images (scaling factor 1, decode = identity)."""

    config = SimpleNamespace(scaling_factor=1.0)
    device = torch.device("cpu")

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=latents)


def pipeline_sampler(model: torch.nn.Module) -> Sampler:
    """The same signature as ``generate_sampler``, through ``DiTPipeline`` + ``dit_fast.accelerate`` (unguided)."""
    import diffusers

    from dit_fast import accelerate
    from dit_fast.checkpoints import to_diffusers_config, to_diffusers_state_dict

    config = model.config
    transformer = diffusers.DiTTransformer2DModel.from_config(to_diffusers_config(config))
    transformer.load_state_dict(to_diffusers_state_dict(model.state_dict(), config), strict=True)
    schedulers = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
                  "dpm++": diffusers.DPMSolverMultistepScheduler}
    pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=_PixelDecoder(), scheduler=schedulers["ddim"]())
    pipe.set_progress_bar_config(disable=True)
    accelerate(pipe)

    def sample(labels: torch.Tensor, sampler: str, steps: int, cfg_scale: float, policy: str, seed: int,
               stats: dict[str, int]) -> torch.Tensor:
        if cfg_scale != 1.0:
            raise ValueError("the DiTPipeline frontier is unguided (DiTPipeline's null class is ImageNet's 1000)")
        pipe.scheduler = schedulers[sampler]()
        accelerate(pipe, cache=None if policy == "none" else policy)
        images = pipe(class_labels=labels.tolist(), guidance_scale=1.0, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(seed), output_type="pt").images  # [0, 1]
        cache = pipe.transformer.step_cache
        if cache is not None:
            stats.update(full_steps=cache.full_steps, cached_steps=cache.cached_steps)
        return images * 2 - 1  # (N, 1, 8, 8) in [-1, 1]

    return sample


def run_frontier(model: torch.nn.Module, args: argparse.Namespace) -> list[FrontierRow]:
    """Every (sampler, guidance, policy) run of ``args``, in order; no cache first in each group."""
    labels = torch.arange(args.samples) % model.config.num_classes
    policies = ["none", *(p for p in args.policies if parse_cache(p) is not None)]
    rows: list[FrontierRow] = []
    sample = pipeline_sampler(model) if args.pipeline else generate_sampler(model)
    guidance = (1.0,) if args.pipeline else (1.0, args.cfg_scale)
    # warm-up (oneDNN primitives, allocator) so that the first timed run is not the slowest for no reason
    sample(labels, "ddim", 3, guidance[-1], "fora:2", args.seed, {})
    for spec in args.samplers:
        sampler, steps = _sampler(spec)
        for cfg_scale in guidance:
            base: FrontierRow | None = None
            for given in policies:
                policy = "none" if given == "none" else parse_cache(given, steps).spec  # "auto" -> its policy
                times: list[tuple[float, float]] = []  # (wall, process CPU) seconds per repeat
                while not times or (sum(w for w, _ in times) < args.min_time and len(times) < args.max_repeats):
                    stats: dict[str, int] = {}
                    t0, c0 = time.perf_counter(), time.process_time()
                    samples = sample(labels, sampler, steps, cfg_scale, policy, args.seed, stats)
                    times.append((time.perf_counter() - t0, time.process_time() - c0))
                seconds, cpu_seconds = min(times)
                scores = evaluate_digits(samples, labels)
                cached = stats.get("cached_steps", 0)
                full = stats.get("full_steps", steps)
                row = FrontierRow(
                    sampler=spec, cfg_scale=cfg_scale, policy=policy, steps=full + cached, full_evals=full,
                    cached_steps=cached, seconds=seconds, speedup=1.0 if base is None else base.seconds / seconds,
                    cpu_seconds=cpu_seconds,
                    cpu_speedup=1.0 if base is None else base.cpu_seconds / cpu_seconds,
                    accuracy=scores["accuracy"], frechet=scores["frechet"],
                    accuracy_delta=0.0 if base is None else scores["accuracy"] - base.accuracy,
                    frechet_ratio=1.0 if base is None else scores["frechet"] / base.frechet)
                base = base or row
                rows.append(row)
                print(f"{spec} cfg {cfg_scale:g} {policy:>14}: {full:4d} full / {row.steps} steps, {seconds:7.2f} s "
                      f"({row.speedup:.2f}x; CPU {cpu_seconds:.2f} s, {row.cpu_speedup:.2f}x), "
                      f"accuracy {100 * row.accuracy:5.1f}% ({100 * row.accuracy_delta:+.1f}), "
                      f"Frechet {row.frechet:.4f} ({row.frechet_ratio:.2f}x)", flush=True)
    return rows


def _is_auto(policy: str, sampler: str) -> bool:
    return policy != "none" and parse_cache(policy) == parse_cache("auto", _sampler(sampler)[1])


def markdown_table(rows: list[FrontierRow]) -> list[str]:
    """The frontier as Markdown table lines."""
    lines = ["| sampler | cfg | cache | full evals / steps | wall s | speed-up | CPU s | CPU speed-up | "
             "class accuracy | Δ acc (pts) | Fréchet | Fréchet / no cache |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r.policy} (auto)**" if _is_auto(r.policy, r.sampler) else r.policy
        lines.append(f"| {r.sampler} | {r.cfg_scale:g} | {name} | {r.full_evals} / {r.steps} | {r.seconds:.1f} | "
                     f"{r.speedup:.2f}x | {r.cpu_seconds:.1f} | {r.cpu_speedup:.2f}x | "
                     f"{100 * r.accuracy:.1f}% | {100 * r.accuracy_delta:+.1f} | {r.frechet:.4f} | "
                     f"{r.frechet_ratio:.2f}x |")
    return lines


def plot(rows: list[FrontierRow], path: Path) -> bool:
    """Fréchet distance and accuracy against speed-up, one column per (sampler, guidance); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r.sampler, r.cfg_scale) for r in rows))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 7), squeeze=False)
    markers = {"none": "*", "fora": "o", "taylor": "s", "adaptive": "^"}
    for col, (sampler, cfg) in enumerate(groups):
        points = [r for r in rows if (r.sampler, r.cfg_scale) == (sampler, cfg)]
        for ax, metric, label in ((axes[0][col], "frechet", "Fréchet distance (lower is better)"),
                                  (axes[1][col], "accuracy", "class accuracy")):
            for r in points:
                value = getattr(r, metric) * (100 if metric == "accuracy" else 1)
                ax.scatter(r.speedup, value, marker=markers[r.policy.split(":")[0]],
                           s=60 if r.policy != "none" else 140)
                ax.annotate(r.policy, (r.speedup, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("wall-time speed-up over no cache")
            ax.set_ylabel(label + (" (%)" if metric == "accuracy" else ""))
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"{sampler}, cfg {cfg:g}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_frontier",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", help="a digits DiT checkpoint (e.g. results/000-DiT-digits/checkpoints/"
                                       "0008000.pt from `dit-fast train`)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="sample nothing: rewrite the .md and .png of a saved run from its .json")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                        help=f"cache specs to compare (default: {' '.join(DEFAULT_POLICIES)}); 'none' always runs")
    parser.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), help="NAME-STEPS, e.g. ddpm-250")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=20.0,
                        help="repeat a run (same seeds, same samples) until its runs add up to this many seconds, "
                             "at most --max-repeats times, and report the fastest (default 20)")
    parser.add_argument("--max-repeats", type=int, default=5)
    parser.add_argument("--impl", choices=["fast", "reference"], default="fast")
    parser.add_argument("--pipeline", action="store_true",
                        help="sample through a diffusers DiTPipeline served by dit_fast.accelerate(pipe, cache=...) "
                             "(unguided; needs diffusers)")
    parser.add_argument("--out", default="benchmarks/results/cache_frontier", help="output path without suffix")
    args = parser.parse_args(argv)
    if args.render:
        render(Path(args.render))
        return 0
    if not args.ckpt:
        parser.error("--ckpt is required (or --render JSON)")
    for spec in args.samplers:
        try:
            _sampler(spec)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
    try:
        for policy in args.policies:
            parse_cache(policy)
    except ValueError as e:
        parser.error(str(e))
    if args.samples < 2 or args.threads < 1 or args.max_repeats < 1:
        parser.error("--samples must be >= 2, --threads and --max-repeats >= 1")
    torch.set_num_threads(args.threads)
    model, description, _ = load_model(args.ckpt, model_name=None, num_classes=None, impl=args.impl,
                                       device=torch.device("cpu"))
    if model.config.in_channels != 1 or model.config.input_size != 8:
        raise SystemExit(f"cache_frontier scores 8x8 digits; {args.ckpt} is a {model.config.in_channels}-channel "
                         f"{model.config.input_size} model")
    print(description, flush=True)
    load_before = os.getloadavg()[0]
    rows = run_frontier(model, args)
    load_after = os.getloadavg()[0]

    command = "python -m benchmarks.cache_frontier " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    served = ("a diffusers DiTPipeline (diffusers' numerics and schedulers, unguided) served by dit_fast.accelerate"
              if args.pipeline else f"{args.impl} model")
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch "
               f"{torch.__version__}, {served}")
    header = (f"{description}. {args.samples} samples per run (classes cycling), one batch, CPU ({machine}). Full "
              f"evals: network passes with every block computed (over the doubled batch when guided); Δ and ratios "
              f"against no cache in the same group. CPU s: the process's CPU time (less sensitive than wall time to "
              f"other work on a shared machine; load average {load_before:.1f} before the runs, {load_after:.1f} "
              f"after, on {os.cpu_count()} cores).")
    write_outputs(Path(args.out), command, header, rows)
    return 0


def write_outputs(out: Path, command: str, header: str, rows: list[FrontierRow]) -> None:
    """Write OUT.md (command, header, the table, the plot), OUT.json and OUT.png."""
    png = out.with_suffix(".png")
    plotted = plot(rows, png)
    lines = ["# Step caching: speed-quality frontier on the digits DiT", "", f"`{command}`", "",
             header + f" `auto` = `{AUTO_SPEC}` for samplers of >= {AUTO_MIN_STEPS} steps, else "
             f"`{AUTO_SPEC_FEW_STEPS}`.", "", *markdown_table(rows), ""]
    if plotted:
        lines += [f"![frontier]({png.name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "header": header,
                                                    "rows": [asdict(r) for r in rows]}, indent=1), encoding="utf-8")
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}" + (f" and {png}" if plotted else
                                                                          " (no plot: matplotlib not installed)"))


def render(json_path: Path) -> None:
    """Rewrite the .md and .png of a saved run (its .json) with the current ``auto`` marking."""
    run = json.loads(json_path.read_text(encoding="utf-8"))
    write_outputs(json_path.with_suffix(""), run["command"], run["header"],
                  [FrontierRow(**row) for row in run["rows"]])

if __name__ == "__main__":
    raise SystemExit(main())
