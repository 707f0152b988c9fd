"""DDPM (DiT's objective) against flow matching (SiT's) on the built-in digits: class accuracy and Fréchet distance
per training step and per sampler budget, as a markdown table.

Train the runs first (same model, steps and seed; one CPU thread each), e.g.::

    dit-fast train --no-eval --keep-last 10 --results-dir runs/ddpm
    dit-fast train --no-eval --keep-last 10 --results-dir runs/flow --objective flow
    dit-fast train --no-eval --keep-last 10 --results-dir runs/flow-lognormal --objective flow \\
        --time-sampling lognormal:0:1

then score their EMA checkpoints::

    python -m benchmarks.flow_digits ddpm=runs/ddpm/000-DiT-digits flow=runs/flow/000-DiT-digits \\
        flow-lognormal=runs/flow-lognormal/000-DiT-digits --steps 2000 4000 8000 --out table.md

Each checkpoint's objective (stored by ``dit-fast train``) picks the samplers: DDPM models are sampled with
DDPM-250 and DPM-Solver++(2M)-20, flow models with the ODE Heun sampler at 10, 20 and 50 network evaluations
(6, 11 and 26 time points). Samples: ``--num-samples`` (classes cycled), seed 0, guided at ``--cfg-scale`` on all
channels, scored by ``dit_fast.metrics.evaluate_digits`` (an RBF-SVM's class accuracy; the Fréchet distance to the
real digits in 32 PCA features). Results are appended to ``--json`` as they finish, so a long run can be stopped
and rendered (``--render-only``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from dit_fast.checkpoints import load_checkpoint
from dit_fast.diffusion import Transport
from dit_fast.models.dit import DiTFast
from dit_fast.sampling.generate import generate
from dit_fast.sampling.metrics import evaluate_digits

DDPM_SAMPLERS = [("ddpm", 250, 250), ("dpm++", 20, 20)]  # (sampler, num_steps, network evaluations)
FLOW_SAMPLERS = [("ode-heun", 6, 10), ("ode-heun", 11, 20), ("ode-heun", 26, 50)]
SAMPLER_NAMES = {"ddpm": "DDPM", "dpm++": "DPM-Solver++(2M)", "ode-heun": "ODE Heun"}


def score_checkpoint(path: Path, num_samples: int, cfg_scale: float) -> list[dict[str, Any]]:
    """Rows {sampler, steps, nfe, accuracy, frechet, seconds} for one checkpoint, one per sampler of its objective."""
    result = load_checkpoint(path, model_cls=DiTFast)
    transport = Transport.from_dict(result.objective) if result.objective.get("name") == "flow" else None
    labels = torch.arange(num_samples) % result.config.num_classes
    rows = []
    for sampler, steps, nfe in DDPM_SAMPLERS if transport is None else FLOW_SAMPLERS:
        start = time.perf_counter()
        samples = generate(result.model, labels, sampler=sampler, num_steps=steps, cfg_scale=cfg_scale,
                           guide_channels="all", seed=0, batch_size=num_samples, clip_denoised=True,
                           progress=False, transport=transport)
        scores = evaluate_digits(samples, labels)
        rows.append({"sampler": sampler, "steps": steps, "nfe": nfe, "accuracy": scores["accuracy"],
                     "frechet": scores["frechet"], "real_frechet": scores["real_frechet"],
                     "seconds": time.perf_counter() - start})
        print(f"{path}: {sampler}-{steps} ({nfe} NFE): accuracy {100 * scores['accuracy']:.1f}%, Frechet "
              f"{scores['frechet']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def render(results: dict[str, Any], command: str, runs: list[str] | None = None) -> str:
    """The markdown table of ``results`` ({run: {step: [rows]}})."""
    lines = ["| run | step | sampler | NFE | class accuracy | Fréchet distance |", "|---|---:|---|---:|---:|---:|"]
    for run in [spec.split("=", 1)[0] for spec in runs] if runs else results:
        by_step = results.get(run, {})
        for step in sorted(by_step, key=int):
            for r in by_step[step]:
                lines.append(f"| {run} | {int(step):,} | {SAMPLER_NAMES[r['sampler']]}-{r['steps']} | {r['nfe']} | "
                             f"{100 * r['accuracy']:.1f}% | {r['frechet']:.3f} |")
    floors = {r["real_frechet"] for by_step in results.values() for rows in by_step.values() for r in rows}
    floor = f"\n\nReal digits against all real digits, same sample count: Fréchet {min(floors):.3f}." if floors else ""
    return "\n".join(lines) + floor + f"\n\nCommand: `{command}`\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=EXPERIMENT_FOLDER (with checkpoints/NNNNNNN.pt)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="flow_digits.json", help="results so far (read back, appended to)")
    parser.add_argument("--out", default=None, help="markdown table path (default: print)")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = Path(args.json)
    results: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    runs = [spec.split("=", 1) for spec in args.runs]
    for step in args.steps if not args.render_only else []:  # every run's step, then the next step
        for name, folder in runs:
            path = Path(folder) / "checkpoints" / f"{step:07d}.pt"
            if str(step) in results.get(name, {}) or not path.is_file():
                continue
            results.setdefault(name, {})[str(step)] = score_checkpoint(path, args.num_samples, args.cfg_scale)
            store.write_text(json.dumps(results, indent=1))
    command = (f"python -m benchmarks.flow_digits {' '.join(args.runs)} --steps {' '.join(map(str, args.steps))} "
               f"--num-samples {args.num_samples} --cfg-scale {args.cfg_scale}")
    table = render(results, command, args.runs)
    if args.out:
        Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
