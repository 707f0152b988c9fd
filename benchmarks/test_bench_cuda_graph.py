"""CUDA-graph sampling: ``dit-fast sample --cuda-graph`` (``CUDAGraphRunner``) against eager, GPU only.

One group ("<config> batch 8 DDIM-<n> cfg 1.5 sample"): the whole guided sampling call ``dit_fast.sample.generate``
(the ``dit-fast sample`` path: DDIM, guidance 1.5 on the doubled batch, the network under autocast in the run's dtype,
the sampler in fp32) with the plain reference eager, DiTFast eager and DiTFast served by CUDA graphs (captured once
per batch shape, replayed every step). Timed rounds after one warm-up round (which captures the graphs).

Parity: the final latents of every case against the fp32 plain reference's on the same draws (a chain of steps: the
bound is ``CHAIN_TOLERANCE_SCALE`` times the single-forward bound, relative to the plain reference's own error in the
run's dtype); the graph's latents are also compared with DiTFast eager's (``max_rel_err_vs_eager``).
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.common import (
    BenchSettings,
    MatmulCeiling,
    forward_gflop,
    impl_model,
    max_rel_err,
    oracle_model,
    record_and_check,
    run_timed,
)
from dit_fast.sampling.generate import generate
from dit_fast.utils.hardware import strict_fp32

GRAPH_IMPLS = ("reference", "dit_fast", "dit_fast+cuda_graph")
BATCH, CFG_SCALE = 8, 1.5
CHAIN_TOLERANCE_SCALE = 10.0

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.fixture(params=GRAPH_IMPLS)
def graph_impl(request: pytest.FixtureRequest) -> str:
    return request.param


def _sample(model: torch.nn.Module, settings: BenchSettings, dtype: torch.dtype, cuda_graph: bool) -> torch.Tensor:
    labels = torch.arange(BATCH, device=settings.device) % model.config.num_classes
    return generate(model, labels, sampler="ddim", num_steps=settings.ddim_steps, cfg_scale=CFG_SCALE, seed=0,
                    batch_size=BATCH, device=settings.device, dtype=dtype, progress=False, cuda_graph=cuda_graph)


@functools.cache
def _oracle(config_name: str, settings: BenchSettings) -> tuple[torch.Tensor, float]:
    reference = oracle_model(config_name, settings.device)
    with strict_fp32():
        exact = _sample(reference, settings, torch.float32, cuda_graph=False)
        low = _sample(reference, settings, settings.dtype, cuda_graph=False)
    return exact, max_rel_err(low, exact) if settings.dtype != torch.float32 else 0.0


def test_cuda_graph_sampling(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, profile_case,
                             graph_impl: str) -> None:
    """Time one whole guided DDIM sampling call; latents checked against the fp32 reference's."""
    settings = bench_settings
    config_name = settings.sizing("sampling").config
    case = f"{config_name} batch {BATCH} DDIM-{settings.ddim_steps} cfg {CFG_SCALE} sample"
    benchmark.group = case
    impl = graph_impl.removesuffix("+cuda_graph")
    # The models run in fp32 weights under autocast, as `dit-fast sample --dtype bf16` does.
    model = impl_model(impl, config_name, settings.device, torch.float32).module
    graph = graph_impl.endswith("+cuda_graph")
    exact, reference_err = _oracle(config_name, settings)
    out = run_timed(benchmark, lambda: _sample(model, settings, settings.dtype, graph), settings.device,
                    settings.sizing("sampling").rounds + 2)
    profile_case(benchmark, lambda: _sample(model, settings, settings.dtype, graph))
    extra = {}
    if graph:
        extra["max_rel_err_vs_eager"] = max_rel_err(out, _sample(model, settings, settings.dtype, False))
    record_and_check(benchmark, impl=graph_impl, case=case, gflop=settings.ddim_steps * forward_gflop(config_name,
                     2 * BATCH), images=BATCH, output=out, oracle=exact, settings=settings, ceiling=matmul_ceiling,
                     model=config_name, reference_err=reference_err, tolerance_scale=CHAIN_TOLERANCE_SCALE, **extra)
