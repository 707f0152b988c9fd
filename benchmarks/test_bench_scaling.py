"""Scaling sweep: achieved GFLOP/s of one forward against each model's Gflops, and the matmul ceiling.

The paper analyses DiT cost by Gflops (S/B/L/XL x patch 8/4/2); this sweep times one inference forward of each
config ("scaling forward" group, case = config and batch) for the plain reference and DiTFast, eager, and records
achieved GFLOP/s (hardware FLOPs: 2 x the paper's Gflops x batch / median time) and the fraction of the matmul
ceiling. The ceiling itself is its own case ("matmul ceiling" group): one pass over the model level's linear
shapes on the fastest GEMM route in the run's dtype (``benchmarks.common.measure_matmul_ceiling``), timed in the
same run. Compiled variants are left to the model level
(``test_bench_model.py``): compiling twelve models would dominate the run.

Sizes: every config at batch 16 on a GPU; DiT-S/8, S/4, S/2 and B/8 at batch 2 on a CPU (``--dit-scaling-configs``,
``--dit-batch`` override).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import (
    BenchSettings,
    MatmulCeiling,
    ceiling_cases,
    forward_gflop,
    gemm_routes,
    impl_model,
    make_inputs,
    max_rel_err,
    oracle_model,
    record_and_check,
    run_timed,
    settings_from_config,
)
from dit_fast.utils.hardware import strict_fp32

SCALING_IMPLS = ("reference", "dit_fast")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "config_name" in metafunc.fixturenames:
        settings = settings_from_config(metafunc.config)
        cases = [(c, i) for c in settings.scaling_configs for i in SCALING_IMPLS if settings.wants(i)]
        metafunc.parametrize(("config_name", "impl"), cases, ids=[f"{c.replace('/', '-')}-{i}" for c, i in cases])


@pytest.fixture(scope="module")
def forward_oracle(bench_settings: BenchSettings):
    """``oracle(config_name) -> (fp32 reference output, the plain reference's own error in the run's dtype)`` on
    ``make_inputs(config_name, batch)``; keeps only the latest config's tensors."""
    cache: dict[str, tuple[torch.Tensor, float]] = {}
    device, dtype = bench_settings.device, bench_settings.dtype
    batch = bench_settings.sizing("scaling").batch

    def oracle(config_name: str) -> tuple[torch.Tensor, float]:
        if config_name not in cache:
            cache.clear()
            x, t, y = make_inputs(config_name, batch, device)
            with strict_fp32(), torch.no_grad():
                exact = oracle_model(config_name, device)(x, t, y)
                reference_err = 0.0
                if dtype != torch.float32:
                    reference_err = max_rel_err(impl_model("reference", config_name, device, dtype)(x, t, y), exact)
            cache[config_name] = (exact, reference_err)
        return cache[config_name]

    return oracle


def test_scaling_forward(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, forward_oracle,
                         config_name: str, impl: str) -> None:
    """One inference forward of ``config_name`` at the scaling batch; output checked against the fp32 reference."""
    benchmark.group = "scaling forward"
    size = bench_settings.sizing("scaling")
    device = bench_settings.device
    model = impl_model(impl, config_name, device, bench_settings.dtype)
    x, t, y = make_inputs(config_name, size.batch, device)
    exact, reference_err = forward_oracle(config_name)
    out = run_timed(benchmark, lambda: model(x, t, y), device, size.rounds)
    record_and_check(benchmark, impl=impl, case=f"{config_name} batch {size.batch}",
                     gflop=forward_gflop(config_name, size.batch), images=size.batch, output=out, oracle=exact,
                     settings=bench_settings, ceiling=matmul_ceiling, model=config_name, reference_err=reference_err)


def test_matmul_ceiling(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling) -> None:
    """The run's GEMM ceiling as a benchmark case: its fastest route over the model's linear shapes, run's dtype."""
    benchmark.group = "matmul ceiling"
    run, gflop = ceiling_cases(bench_settings.device, bench_settings.dtype, matmul_ceiling.shapes)[matmul_ceiling.route]
    device, dtype = bench_settings.device, bench_settings.dtype
    run_timed(benchmark, run, device, bench_settings.sizing("scaling").rounds)
    gen = torch.Generator().manual_seed(0)
    m, k, n = matmul_ceiling.shapes[0]
    x, w = (torch.randn(rows, k, generator=gen).to(device, dtype) for rows in (m, n))
    out = gemm_routes(device, dtype)[matmul_ceiling.route](x, w)  # the route's result, checked in fp32
    with strict_fp32():
        exact = x.float() @ w.float().t()
    record_and_check(benchmark, impl="matmul", case=f"{matmul_ceiling.route} {bench_settings.dtype_name}",
                     gflop=gflop, images=None, output=out, oracle=exact, settings=bench_settings,
                     ceiling=matmul_ceiling, route=matmul_ceiling.route, routes=matmul_ceiling.routes)
