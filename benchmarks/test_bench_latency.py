"""Latency level: seconds per guided image with DiTFast's weights cast once to the run's dtype (``--dit-dtype``).

Group "latency <config> dpm++-<steps>": one guided image (cfg 4, a doubled batch of 2 per network call) sampled with
DPM-Solver++ without a step cache and with ``fora:2``, on DiTFast built by the suite's factory (bf16: weights cast
once, fp32 residual stream, no autocast). The sampled latents are checked against the fp32 plain reference's with
the same cache on the same noise, with the sampling chain's tolerance. GFLOP counts the full network evaluations.
``python -m benchmarks.image_latency`` is the full table (DDPM-250 / DDIM-50 / DPM-Solver++-20, fp32 vs bf16, VAE
decode) for DiT-XL/2 at 256 px.

Sizes: the sampling level's config (DiT-S/2 on a CPU, XL/2 on a GPU) and ``2 x --dit-ddim-steps`` DPM-Solver++ steps.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import (
    BenchSettings,
    MatmulCeiling,
    build_model,
    forward_gflop,
    record_and_check,
    reference_model,
    run_timed,
)
from dit_fast.sampling.generate import generate
from dit_fast.utils.hardware import strict_fp32

CACHES = ("none", "fora:2")
CFG_SCALE = 4.0
CHAIN_TOLERANCE_SCALE = 10.0  # the sampling level's bound for a chain (x the single-forward bound)


@pytest.mark.parametrize("cache", CACHES)
def test_image_latency(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, cache: str) -> None:
    size = bench_settings.sizing("sampling")
    device, dtype, steps = bench_settings.device, bench_settings.dtype, 2 * bench_settings.ddim_steps
    benchmark.group = f"latency {size.config} dpm++-{steps}"
    reference = reference_model(size.config, device)
    model = build_model(reference.config, device, dtype, fast=True, state_dict=reference.state_dict())
    label = torch.tensor([3])
    kwargs = {"sampler": "dpm++", "num_steps": steps, "cfg_scale": CFG_SCALE, "progress": False, "device": device}
    stats: dict[str, int] = {}

    def sample() -> torch.Tensor:
        stats.clear()
        return generate(model, label, cache=cache, cache_stats=stats, **kwargs)

    out = run_timed(benchmark, sample, device, rounds=1)
    full, cached = stats.get("full_steps", steps), stats.get("cached_steps", 0)
    with strict_fp32():
        exact = generate(reference, label, cache=cache, **kwargs)
    record_and_check(benchmark, impl="dit_fast", case=f"{size.config} dpm++-{steps} {cache}",
                     gflop=2 * forward_gflop(size.config, 1) * full, images=1, output=out, oracle=exact,
                     settings=bench_settings, ceiling=matmul_ceiling, model=size.config,
                     tolerance_scale=CHAIN_TOLERANCE_SCALE, full_steps=full, cached_steps=cached)
