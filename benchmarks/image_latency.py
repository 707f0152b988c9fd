"""Seconds per image: one guided DiT-XL/2 256x256 image with VAE decode, fp32 vs bf16, per sampler and step cache.

``python -m benchmarks.image_latency`` prints, for each dtype (fp32, bf16: weights cast once) and each sampler
(DDPM-250, DDIM-50, DPM-Solver++-20) without a cache and with ``fora:2`` (a fixed schedule, whose quality the cache
frontier measured; never an adaptive cache on random weights, whose skip pattern would mean nothing):

- full network evaluations and cached steps, counted by running the real sampler and cache policy on the same step
  count (with a tiny stand-in network: the counts depend on the schedule only);
- seconds per full step and per cached step, measured on the real model (random weights: time does not depend on
  them) by a short guided ``fora:2`` run of the same sampler (2 x ``--probe-steps`` steps, each network call timed);
- seconds per image = full steps x s/full + cached steps x s/cached + the VAE decode, the fixed cost (imports, model
  build and load: ``python -m benchmarks.time_to_first_step``) apart. With ``--full`` each cell is timed end to end
  instead (DDPM-250 on XL/2 takes tens of minutes on a 2-core CPU).

The VAE is a randomly initialised diffusers ``AutoencoderKL`` of the sd-vae-ft config (no download), decoding in
the row's dtype (as ``dit-fast sample`` does on a device with native bf16).
``--config``/``--image-size`` shrink the case (e.g. DiT-S/2 for a quick look); ``--dtypes`` picks dtypes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks.common import build_model
from dit_fast.models.config import get_config
from dit_fast.models.vae import VAE
from dit_fast.sampling.generate import generate

SAMPLERS: tuple[tuple[str, int], ...] = (("ddpm", 250), ("ddim", 50), ("dpm++", 20))
CACHES: tuple[str, ...] = ("none", "fora:2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CFG_SCALE = 4.0


@dataclass
class Cell:
    """One (dtype, sampler, cache) row: step counts, per-step seconds and the per-image estimate (or measurement)."""

    dtype: str
    sampler: str
    steps: int
    cache: str
    full: int
    cached: int
    s_full: float
    s_cached: float
    vae_s: float
    measured_s: float | None = None

    @property
    def sampling_s(self) -> float:
        if self.measured_s is not None:
            return self.measured_s
        return self.full * self.s_full + self.cached * self.s_cached

    @property
    def image_s(self) -> float:
        return self.sampling_s + self.vae_s


def random_vae(folder: str, image_size: int) -> VAE:
    """A randomly initialised AutoencoderKL of the sd-vae-ft config (4 latent channels, 8x), loaded through
    ``dit_fast.vae.VAE`` from ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = 4
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                  up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=4, sample_size=image_size).save_pretrained(folder)
    return VAE(folder)


def step_counts(config_name: str, sampler: str, steps: int, cache: str) -> tuple[int, int]:
    """(full network evaluations, cached steps) of one guided image: the real sampler and cache policy run on a
    tiny stand-in network of the same input shape (the counts depend on the schedule only)."""
    cfg = get_config(config_name)
    tiny = build_model(cfg.replace(hidden_size=16, depth=1, num_heads=1), torch.device("cpu"), fast=True)
    calls: list[int] = []
    tiny.final_layer.register_forward_hook(lambda *_: calls.append(1))  # once per network call, cached or not
    stats: dict[str, int] = {}
    generate(tiny, torch.tensor([1]), sampler=sampler, num_steps=steps, cfg_scale=CFG_SCALE, cache=cache,
             progress=False, cache_stats=stats)
    if cache == "none":
        return len(calls), 0
    return stats["full_steps"], stats["cached_steps"]


def timed_generate(model: torch.nn.Module, sampler: str, steps: int, cache: str) -> tuple[float, dict[str, int]]:
    """Seconds of one guided single-image run (one doubled batch of 2 per network call), and its cache counts."""
    stats: dict[str, int] = {}
    start = time.perf_counter()
    generate(model, torch.tensor([207]), sampler=sampler, num_steps=steps, cfg_scale=CFG_SCALE, cache=cache,
             progress=False, cache_stats=stats)
    return time.perf_counter() - start, stats


def per_step_seconds(model: torch.nn.Module, sampler: str, probe_steps: int) -> tuple[float, float]:
    """(s per full step, s per cached step) of ``sampler``, from one ``fora:2`` run of ``2 * probe_steps`` steps:
    every network call is timed, the ``full`` slowest are the full steps; the sampler's own arithmetic (the run's
    time outside the network) is spread over all steps."""
    durations: list[float] = []
    forward_with_cfg = model.forward_with_cfg

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = forward_with_cfg(*args, **kwargs)
        durations.append(time.perf_counter() - start)
        return out

    model.forward_with_cfg = timed
    try:
        seconds, stats = timed_generate(model, sampler, 2 * probe_steps, "fora:2")
    finally:
        del model.forward_with_cfg
    full = stats["full_steps"]
    overhead = (seconds - sum(durations)) / len(durations)
    durations.sort(reverse=True)
    return statistics.median(durations[:full]) + overhead, statistics.median(durations[full:]) + overhead


def measure(config_name: str, dtypes: list[str], probe_steps: int, full_runs: bool, image_size: int
            ) -> list[Cell]:
    """Every (dtype, sampler, cache) cell, one dtype's model at a time (XL/2 in fp32 takes 2.7 GB)."""
    cfg = get_config(config_name)
    vae_seconds = {}
    with tempfile.TemporaryDirectory() as folder:
        random_vae(folder, image_size)
        z = torch.randn(1, cfg.in_channels, *cfg.grid_input)
        for name in dtypes:  # the VAE decodes in the sampling dtype, as `dit-fast sample` does
            vae = VAE(folder, dtype=DTYPES[name])
            vae.decode(z)  # warm-up
            vae_seconds[name] = statistics.median(_seconds(lambda v=vae: v.decode(z)) for _ in range(3))
    counts = {(s, n, c): step_counts(config_name, s, n, c) for s, n in SAMPLERS for c in CACHES}
    cells = []
    for name in dtypes:
        model = build_model(cfg, torch.device("cpu"), DTYPES[name], fast=True)
        timed_generate(model, "ddim", 1, "none")  # warm-up
        for sampler, steps in SAMPLERS:
            s_full, s_cached = per_step_seconds(model, sampler, probe_steps)
            for cache in CACHES:
                full, cached = counts[(sampler, steps, cache)]
                cell = Cell(name, sampler, steps, cache, full, cached, s_full, s_cached, vae_seconds[name])
                if full_runs:
                    cell.measured_s = timed_generate(model, sampler, steps, cache)[0]
                cells.append(cell)
                print(_row(cell), flush=True)
        del model
    return cells


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


HEADER = ("| dtype | sampler | cache | full NFE | cached steps | s / full step | s / cached step | sampling s | "
          "VAE decode s | s / image (fixed cost apart) |\n|---|---|---|---|---|---|---|---|---|---|")


def _row(c: Cell) -> str:
    how = "measured" if c.measured_s is not None else "per-step x steps"
    cached = f"{c.s_cached:.2f}" if c.cached else "-"
    return (f"| {c.dtype} | {c.sampler}-{c.steps} | {c.cache} | {c.full} | {c.cached} | {c.s_full:.2f} | {cached} | "
            f"{c.sampling_s:.1f} ({how}) | {c.vae_s:.2f} | {c.image_s:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.image_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="DiT-XL/2", help="model config (default DiT-XL/2)")
    parser.add_argument("--image-size", type=int, default=256, help="pixels (the VAE's sample size)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--probe-steps", type=int, default=3, help="steps of the per-step timing runs")
    parser.add_argument("--full", action="store_true", help="time every cell end to end (slow)")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if unknown := [d for d in dtypes if d not in DTYPES]:
        parser.error(f"--dtypes: unknown {unknown}; choose from {', '.join(DTYPES)}")
    load = os.getloadavg()[0]
    print(f"{args.config} {args.image_size}px, one guided image (cfg {CFG_SCALE}, batch 2 per network call), "
          f"{torch.get_num_threads()} threads; load average {load:.2f}\n{HEADER}", flush=True)
    measure(args.config, dtypes, args.probe_steps, args.full, args.image_size)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
