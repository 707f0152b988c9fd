"""Step caching: time of a whole guided sampling loop per cache policy, and how far its final sample moves.

One group ("caching") on one case: DiT at the sampling level's config (DiT-S/2 on a CPU, DiT-XL/2 on a GPU) with
the suite's random weights (zero-init layers randomized), batch ``CACHE_BATCH`` (1 on a CPU, 4 on a GPU;
``--dit-batch`` overrides), guided DDPM (scale 1.5, official 3-channel guidance) over ``CACHE_STEPS`` steps (6 on a
CPU so the group takes a few minutes, 250 on a GPU). Rows: the plain reference and DiTFast without a cache (the
baselines), then DiTFast under each policy of ``POLICIES``. ``max_rel_err`` is
the final sample's distance from the fp32 reference's uncached sample on the same noise and draws (for the
uncached DiTFast row, its usual parity; for cached rows, the caching error, which random weights exaggerate: a
trained model's features change far less between steps); ``gflop`` counts the full network evaluations only.
``python -m benchmarks.cache_frontier`` measures the quality side on a trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from benchmarks.common import (
    BenchSettings,
    MatmulCeiling,
    forward_gflop,
    impl_model,
    import_or_skip,
    max_rel_err,
    median_seconds,
    oracle_model,
    run_timed,
)
from dit_fast.models.config import get_config
from dit_fast.utils.hardware import strict_fp32

CFG_SCALE = 1.5
CACHE_STEPS = {"cpu": 6, "cuda": 250}
CACHE_BATCH = {"cpu": 1, "cuda": 4}
POLICIES = ("none", "auto", "fora:2", "fora:3", "taylor:3:2", "adaptive:0.15:4")
CASES = [("reference", "none"), *(("dit_fast", p) for p in POLICIES)]


@dataclass(frozen=True)
class CachingCase:
    """Guided DDPM with ``steps`` steps of ``config`` over ``batch`` images."""

    config: str
    batch: int
    steps: int
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.config} batch {self.batch} DDPM-{self.steps} cfg {CFG_SCALE}"

    def run(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, cache: str,
            stats: dict[str, int]) -> torch.Tensor:
        """Sample with ``model`` under ``cache``: -> final latents (B, C, H, W) fp32 (same noise and draws for every
        row: the global seed is reset first)."""
        sample = import_or_skip("dit_fast.sampling.generate", "caching benchmarks")
        cfg = get_config(self.config)
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.batch, cfg.in_channels, *cfg.grid_input, generator=gen).to(device)
        labels = torch.randint(0, cfg.num_classes, (self.batch,), generator=gen).to(device)
        torch.manual_seed(self.seed)
        stats.clear()
        with torch.no_grad():
            return sample.sample_batch(model, noise, labels, sampler="ddpm", num_steps=self.steps,
                                       cfg_scale=CFG_SCALE, null_class=cfg.num_classes, dtype=dtype, cache=cache,
                                       cache_stats=stats)


@pytest.fixture(scope="module")
def caching_oracle(bench_settings: BenchSettings) -> dict[CachingCase, torch.Tensor]:
    """Uncached fp32 reference samples, per case (filled on first use)."""
    return {}


@pytest.mark.parametrize(("impl", "cache"), CASES, ids=[f"{i}-{c}" for i, c in CASES])
def test_caching(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, caching_oracle,
                 impl: str, cache: str) -> None:
    """Time one guided sampling loop of ``impl`` under ``cache``; record its distance from the uncached sample."""
    if not bench_settings.wants(impl):
        pytest.skip(f"{impl} not selected (--dit-impls)")
    size = bench_settings.sizing("sampling")
    batch = bench_settings.batch or CACHE_BATCH[bench_settings.kind]
    case = CachingCase(size.config, batch, CACHE_STEPS[bench_settings.kind], bench_settings.seed)
    benchmark.group = "caching"
    device, dtype = bench_settings.device, bench_settings.dtype
    if case not in caching_oracle:
        with strict_fp32():
            caching_oracle[case] = case.run(oracle_model(case.config, device, "official", case.seed), device,
                                            torch.float32, "none", {})
    module = impl_model(impl, case.config, device, dtype, case.seed).module  # the weights in the run's dtype
    stats: dict[str, int] = {}
    out = run_timed(benchmark, lambda: case.run(module, device, dtype, cache, stats), device, size.rounds)
    full = stats.get("full_steps", case.steps)
    gflop = full * forward_gflop(case.config, 2 * case.batch)
    info = {"impl": impl if cache == "none" else f"{impl} cache={cache}", "case": case.label, "cache": cache,
            "full_evals": full, "cached_steps": stats.get("cached_steps", 0), "steps": case.steps, "gflop": gflop,
            "images": case.batch, "max_rel_err": max_rel_err(out, caching_oracle[case]),
            "dtype": bench_settings.dtype_name, "device": str(device), "ceiling_gflops": matmul_ceiling.gflops,
            "model": case.config, "cfg_scale": CFG_SCALE}
    median = median_seconds(benchmark)
    if median:
        info.update(gflops=gflop / median, images_per_s=case.batch / median,
                    frac_ceiling=gflop / median / matmul_ceiling.gflops)
        if device.type == "cuda":
            info["mfu"] = info["frac_ceiling"]
    benchmark.extra_info.update(info)
    assert torch.isfinite(out).all(), f"{impl} with cache {cache}: non-finite samples"
