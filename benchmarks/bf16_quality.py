"""Does bf16 sampling keep the samples? The digits model sampled in fp32 and with bf16 weights
(``DiTFast.for_inference``: weights cast once, fp32 residual stream), same seeds, scored side by side; and DiT-XL/2's
bf16 forward error against fp64, DiTFast's next to the plain reference's in bf16.

Train the digits model first (``dit-fast train``, the built-in default), then::

    python -m benchmarks.bf16_quality runs/000-DiT-digits/checkpoints/0008000.pt --out quality.md
    python -m benchmarks.bf16_quality CKPT --xl   # also DiT-XL/2 with random weights (minutes: bf16 loops on AVX2)

Digits: ``--num-samples`` (classes cycled), DDPM-``--steps``, unguided and guided at ``--cfg-scale`` on all channels,
seed 0 for both dtypes, scored by ``dit_fast.metrics.evaluate_digits`` (an RBF-SVM's class accuracy; Fréchet distance
to the real digits in 32 PCA features). The bar: accuracy within 0.5 points of fp32 and Fréchet distance within 1.05x.
The share of samples whose predicted class differs between the dtypes and the largest pixel difference say how far
the two runs drift apart from the same noise.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import build_model, reference_model
from dit_fast.checkpoints import load_checkpoint
from dit_fast.models.dit import DiTFast
from dit_fast.sampling.generate import generate
from dit_fast.sampling.metrics import evaluate_digits

ACCURACY_POINTS = 0.5  # bf16 accuracy within this many points of fp32
FRECHET_RATIO = 1.05  # bf16 Fréchet distance at most this multiple of fp32's


def digits_rows(ckpt: str, num_samples: int, steps: int, cfg_scale: float) -> list[dict[str, Any]]:
    """One row per guidance setting: fp32 and bf16 scores of the same seeds, and the drift between them."""
    model = load_checkpoint(ckpt, model_cls=DiTFast).model.eval().requires_grad_(False)
    labels = torch.arange(num_samples) % model.config.num_classes
    rows = []
    for name, scale in (("unguided", 1.0), ("guided", cfg_scale)):
        row: dict[str, Any] = {"guidance": name, "cfg_scale": scale}
        samples = {}
        for dtype in (torch.float32, torch.bfloat16):
            key = str(dtype).removeprefix("torch.")
            start = time.perf_counter()
            samples[key] = generate(model, labels, sampler="ddpm", num_steps=steps, cfg_scale=scale,
                                    guide_channels="all", seed=0, batch_size=num_samples, dtype=dtype,
                                    clip_denoised=True, progress=False)
            scores = evaluate_digits(samples[key], labels)
            row[key] = {"accuracy": scores["accuracy"], "frechet": scores["frechet"],
                        "seconds": time.perf_counter() - start}
            print(f"{name} {key}: accuracy {100 * scores['accuracy']:.2f}%, Frechet {scores['frechet']:.4f} "
                  f"({row[key]['seconds']:.0f} s)", flush=True)
        row["max_abs_diff"] = (samples["float32"] - samples["bfloat16"]).abs().max().item()
        row["mean_abs_diff"] = (samples["float32"] - samples["bfloat16"]).abs().mean().item()
        row["accuracy_delta_points"] = 100 * (row["bfloat16"]["accuracy"] - row["float32"]["accuracy"])
        row["frechet_ratio"] = row["bfloat16"]["frechet"] / row["float32"]["frechet"]
        row["passes"] = row["accuracy_delta_points"] >= -ACCURACY_POINTS and row["frechet_ratio"] <= FRECHET_RATIO
        rows.append(row)
    return rows


def xl_errors(batch: int) -> dict[str, float]:
    """DiT-XL/2 (the suite's random weights, zero-init layers randomized so that every block counts; 32x32x4
    latents): max error / max |output| against fp64 of DiTFast with bf16 weights and of the plain reference in bf16."""
    device = torch.device("cpu")
    ref = reference_model("DiT-XL/2", device)
    torch.manual_seed(0)
    x = torch.randn(batch, 4, 32, 32)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 1000, (batch,))
    out: dict[str, float] = {}
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x.double(), t, y)
        scale = exact.abs().max().item()
        fast = build_model(ref.config, device, torch.bfloat16, fast=True, state_dict=ref.state_dict())
        out["ditfast_bf16"] = (fast(x.bfloat16(), t, y).double() - exact).abs().max().item() / scale
        del fast
        out["reference_bf16"] = (ref.bfloat16()(x.bfloat16(), t, y).double() - exact).abs().max().item() / scale
    print(f"XL/2 batch {batch}: max error / max |out| vs fp64: DiTFast bf16 {out['ditfast_bf16']:.3g}, reference "
          f"bf16 {out['reference_bf16']:.3g}", flush=True)
    return out


def render(rows: list[dict[str, Any]], xl: dict[str, float] | None, command: str) -> str:
    header = ["| guidance | fp32 accuracy | bf16 accuracy | Δ points | fp32 Fréchet | bf16 Fréchet | ratio | "
              "mean / max pixel diff | within the bar |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines = header if rows else []
    for r in rows:
        f, b = r["float32"], r["bfloat16"]
        lines.append(f"| {r['guidance']} (cfg {r['cfg_scale']:g}) | {100 * f['accuracy']:.2f}% | "
                     f"{100 * b['accuracy']:.2f}% | {r['accuracy_delta_points']:+.2f} | {f['frechet']:.4f} | "
                     f"{b['frechet']:.4f} | {r['frechet_ratio']:.3f} | {r['mean_abs_diff']:.4f} / "
                     f"{r['max_abs_diff']:.3f} | {'yes' if r['passes'] else 'NO'} |")
    if xl is not None:
        lines += ["", "| DiT-XL/2, random weights | max error / max abs output vs fp64 |", "|---|---:|",
                  f"| DiTFast, bf16 weights (fp32 residual stream) | {xl['ditfast_bf16']:.3g} |",
                  f"| plain reference in bf16 | {xl['reference_bf16']:.3g} |"]
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="?", help="a trained digits checkpoint (dit-fast train's "
                        "checkpoints/NNNNNNN.pt); without one, only --xl runs")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=250, help="DDPM steps")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--xl", action="store_true", help="also DiT-XL/2's forward error (random weights)")
    parser.add_argument("--xl-batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="markdown path (default: print only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt is None and not args.xl:
        parser.error("give a digits checkpoint, --xl, or both")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        parser.error(f"no checkpoint at {args.ckpt} (train one with `dit-fast train`)")
    rows = digits_rows(args.ckpt, args.num_samples, args.steps, args.cfg_scale) if args.ckpt else []
    xl = xl_errors(args.xl_batch) if args.xl else None
    digits = f" {args.ckpt} --num-samples {args.num_samples} --steps {args.steps} --cfg-scale {args.cfg_scale}"
    command = (f"python -m benchmarks.bf16_quality{digits if args.ckpt else ''}"
               + (f" --xl --xl-batch {args.xl_batch}" if args.xl else ""))
    table = render(rows, xl, command)
    if args.out:
        Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
