"""End-to-end sampling: images/s of classifier-free-guided DDPM (the paper's 250 steps) and DDIM sampling.

One group per sampler ("sampling ddpm", "sampling ddim") compares every implementation of ``IMPLS`` on the same
noise, labels and random draws: the plain reference eager, the reference under ``torch.compile``, DiTFast eager and
compiled, and diffusers' ``DiTTransformer2DModel`` with the same weights. The model runs in the run's dtype inside
an fp32 sampling loop (guidance scale 1.5, the official 3-channel guidance of ``CFGModel``, so each step is one
forward over the doubled batch); the final latents are checked against the fp32 reference's (with the same
numerics) on the same draws.

Sizes: on a GPU the paper's DiT-XL/2 with DDPM-250 and DDIM-50 at batch 4; on a CPU DiT-S/2 at batch 4 with
DDPM-6 and DDIM-3, so the suite finishes in minutes (``--dit-config``, ``--dit-batch``, ``--dit-sample-steps`` and
``--dit-ddim-steps`` override). images/s = batch / median time of one whole sampling loop (VAE decoding excluded).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
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
    oracle_model,
    record_and_check,
    run_timed,
    settings_from_config,
)
from dit_fast.models.config import get_config
from dit_fast.utils.hardware import strict_fp32

SAMPLERS = ("ddpm", "ddim")
CFG_SCALE = 1.5
# A sampling chain accumulates the per-step error: its bound is this many times the single-forward dtype bound.
CHAIN_TOLERANCE_SCALE = 10.0

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "impl" in metafunc.fixturenames and "sampler" in metafunc.fixturenames:
        settings = settings_from_config(metafunc.config)
        cases = [(sampler, impl) for sampler in SAMPLERS for impl in settings.impls]
        metafunc.parametrize(("sampler", "impl"), cases, ids=[f"{s}-{i}" for s, i in cases])


@dataclass(frozen=True)
class SamplingCase:
    """One sampling run: ``sampler`` ("ddpm" or "ddim") with ``steps`` steps of ``config`` over ``batch`` images."""

    sampler: str
    steps: int
    config: str
    batch: int
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.config} batch {self.batch} {self.sampler.upper()}-{self.steps} cfg {CFG_SCALE}"

    @property
    def gflop(self) -> float:
        """Model work of the whole loop: one forward over the doubled (guided) batch per step."""
        return self.steps * forward_gflop(self.config, 2 * self.batch)

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T (B, C, H, W) fp32 and labels (B,), the same values on every device."""
        cfg = get_config(self.config)
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.batch, cfg.in_channels, *cfg.grid_input, generator=gen)
        labels = torch.randint(0, cfg.num_classes, (self.batch,), generator=gen)
        return noise.to(device), labels.to(device)

    def run(self, model: Model, device: torch.device) -> torch.Tensor:
        """Sample with ``model`` (any dtype; its output is cast to fp32): -> final latents (B, C, H, W) fp32.

        The global seed is reset first, so DDPM's per-step noise draws are the same for every implementation.
        """
        diffusion = import_or_skip("dit_fast.diffusion", "sampling benchmarks")
        spacing = str(self.steps) if self.sampler == "ddpm" else f"ddim{self.steps}"
        sampler = diffusion.create_diffusion(spacing)
        null_class = get_config(self.config).num_classes
        guided = diffusion.CFGModel(lambda x, t, y: model(x, t, y).float(), CFG_SCALE, null_class)
        loop = sampler.p_sample_loop if self.sampler == "ddpm" else sampler.ddim_sample_loop
        noise, labels = self.inputs(device)
        torch.manual_seed(self.seed)
        return loop(guided, tuple(noise.shape), noise=noise, clip_denoised=False, model_kwargs={"y": labels},
                    device=device)


def sampling_case(settings: BenchSettings, sampler: str) -> SamplingCase:
    size = settings.sizing("sampling")
    steps = settings.ddpm_steps if sampler == "ddpm" else settings.ddim_steps
    return SamplingCase(sampler, steps, size.config, size.batch, settings.seed)


@pytest.fixture(scope="module")
def sampling_oracle(bench_settings: BenchSettings) -> Callable[[SamplingCase, str], tuple[torch.Tensor, float]]:
    """``oracle(case, numerics) -> (fp32 reference latents, the plain reference's own error in the run's dtype)``,
    computed once per case and numerics."""
    cache: dict[tuple[SamplingCase, str], tuple[torch.Tensor, float]] = {}
    device, dtype = bench_settings.device, bench_settings.dtype

    def oracle(case: SamplingCase, numerics: str) -> tuple[torch.Tensor, float]:
        if (case, numerics) not in cache:
            reference = oracle_model(case.config, device, numerics, case.seed)
            with strict_fp32(), torch.no_grad():
                exact = case.run(reference, device)
                reference_err = 0.0
                if dtype != torch.float32:
                    low = copy.deepcopy(reference).to(dtype)
                    reference_err = max_rel_err(case.run(lambda x, t, y: low(x.to(dtype), t, y), device), exact)
            cache[(case, numerics)] = (exact, reference_err)
        return cache[(case, numerics)]

    return oracle


def test_sampling(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, sampling_oracle,
                  sampler: str, impl: str) -> None:
    """Time one whole guided sampling loop of ``impl``; its final latents must match the fp32 reference's."""
    case = sampling_case(bench_settings, sampler)
    benchmark.group = f"sampling {sampler}"
    device = bench_settings.device
    model = impl_model(impl, case.config, device, bench_settings.dtype, case.seed)
    exact, reference_err = sampling_oracle(case, model.numerics)
    out = run_timed(benchmark, lambda: case.run(model, device), device, bench_settings.sizing("sampling").rounds)
    record_and_check(benchmark, impl=impl, case=case.label, gflop=case.gflop, images=case.batch, output=out,
                     oracle=exact, settings=bench_settings, ceiling=matmul_ceiling, model=case.config,
                     reference_err=reference_err, tolerance_scale=CHAIN_TOLERANCE_SCALE, steps=case.steps,
                     sampler=sampler, cfg_scale=CFG_SCALE)
