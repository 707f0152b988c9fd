"""Model level: one inference forward, and one training step, of a config per implementation.

Groups "<config> batch <B> forward" and "<config> batch <B> train step" compare, on the same weights and inputs, the
plain reference (eager, and its blocks ``torch.compile``d), DiTFast (eager, and ``DiTFast.compile()``) and diffusers
(forward only, when installed). Work per call: ``dit_fast.gflops(config) * 2 * batch`` hardware GFLOP for a forward,
3x that for a training step (forward + backward of ``mean(out^2)``, no optimizer step). Every case records the
keys of ``benchmarks.common`` (``gflops``, ``frac_ceiling`` against the run's matmul ceiling, ``mfu`` on a GPU) and
fails when its output (forward) or its parameter gradients (training step) miss the parity bound against the fp32
reference. Models run in eval mode (no label dropout, so every implementation sees the same labels); gradients flow.

CPU default: DiT-S/2 on 32x32x4 latents in fp32 (``--dit-batch 8`` for the issue's batch of 8); GPU: DiT-XL/2 in
bf16. For example::

    .venv/bin/pytest benchmarks/test_bench_model.py --benchmark-only --dit-batch 8 --dit-rounds 5

pytest-benchmark times one implementation after another, so on a shared machine a change of load between cases
skews their ratios. ``python -m benchmarks.test_bench_model`` measures the same cases interleaved instead (every
round times each implementation and every GEMM route of the ceiling once, in turn) and prints the median over rounds
of each round's ratios, which such load changes affect far less; ``--forward-only`` skips the training steps.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from benchmarks.common import (
    BenchSettings,
    MatmulCeiling,
    ceiling_cases,
    compile_regionally,
    forward_gflop,
    gemm_shapes,
    impl_model,
    make_inputs,
    max_rel_err,
    oracle_model,
    record_and_check,
    run_timed,
    settings_from_config,
    synchronize,
)
from dit_fast.utils.hardware import strict_fp32

TRAIN_IMPLS = ("reference", "reference+compile", "dit_fast", "dit_fast+compile")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = settings_from_config(metafunc.config)
    if "forward_impl" in metafunc.fixturenames:
        metafunc.parametrize("forward_impl", [i for i in settings.impls])
    if "train_impl" in metafunc.fixturenames:
        metafunc.parametrize("train_impl", [i for i in TRAIN_IMPLS if settings.wants(i)])


@functools.lru_cache(maxsize=8)
def trainable_model(impl: str, config_name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A trainable copy of ``impl`` (the shared benchmark models are frozen): same weights, gradients on.

    Reference and DiTFast only; "+compile" compiles the copy's blocks as the forward level does (regionally).
    """
    eager = impl_model(impl.removesuffix("+compile"), config_name, device, dtype)
    module = copy.deepcopy(eager.module).requires_grad_(True)
    if impl.endswith("+compile"):
        return module.compile() if eager.impl == "dit_fast" else compile_regionally(module)
    return module


def _backward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """One forward + backward (the timed work of a training step here; no optimizer)."""
    model.zero_grad(set_to_none=True)
    model(x, t, y).float().square().mean().backward()


def _gradients(model: nn.Module) -> torch.Tensor:
    """Every parameter gradient, flattened and concatenated in fp32 (for the parity check, never timed)."""
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def _train_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One forward + backward; returns every parameter gradient, flattened and concatenated in fp32."""
    _backward(model, x, t, y)
    return _gradients(model)


@pytest.fixture(scope="module")
def train_oracle(bench_settings: BenchSettings):
    """(fp32 reference gradients, the plain reference's own gradient error in the run's dtype) for the model level's
    config and batch."""
    size = bench_settings.sizing("model")
    device, dtype = bench_settings.device, bench_settings.dtype
    x, t, y = make_inputs(size.config, size.batch, device)
    with strict_fp32():
        exact = _train_step(trainable_model("reference", size.config, device, torch.float32), x, t, y)
        reference_err = 0.0
        if dtype != torch.float32:
            plain = trainable_model("reference", size.config, device, dtype)
            reference_err = max_rel_err(_train_step(plain, x.to(dtype), t, y), exact)
    return exact, reference_err


def test_forward(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, profile_case,
                 forward_impl: str) -> None:
    """One inference forward (no grad): images/s and GFLOP/s; output checked against the fp32 reference; profiled
    with ``--dit-profile``."""
    size = bench_settings.sizing("model")
    device, dtype = bench_settings.device, bench_settings.dtype
    benchmark.group = f"{size.config} batch {size.batch} forward"
    model = impl_model(forward_impl, size.config, device, dtype)
    x, t, y = make_inputs(size.config, size.batch, device)
    out = run_timed(benchmark, lambda: model(x, t, y), device, size.rounds)
    with torch.no_grad():
        profile_case(benchmark, lambda: model(x, t, y))
    with strict_fp32(), torch.no_grad():
        exact = oracle_model(size.config, device, model.numerics)(x, t, y)
        reference_err = 0.0
        if dtype != torch.float32:
            reference_err = max_rel_err(impl_model("reference", size.config, device, dtype)(x, t, y), exact)
    record_and_check(benchmark, impl=forward_impl, case=f"{size.config} batch {size.batch} forward",
                     gflop=forward_gflop(size.config, size.batch), images=size.batch, output=out, oracle=exact,
                     settings=bench_settings, ceiling=matmul_ceiling, model=size.config, reference_err=reference_err)


def test_train_step(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, train_oracle,
                    train_impl: str) -> None:
    """One training step (forward + backward): images/s and GFLOP/s (3x a forward); every parameter gradient checked
    against the fp32 reference's."""
    size = bench_settings.sizing("model")
    device, dtype = bench_settings.device, bench_settings.dtype
    benchmark.group = f"{size.config} batch {size.batch} train step"
    model = trainable_model(train_impl, size.config, device, dtype)
    x, t, y = make_inputs(size.config, size.batch, device)
    x = x.to(dtype)
    run_timed(benchmark, lambda: _backward(model, x, t, y), device, size.rounds, grad=True)
    grads = _gradients(model)  # of the last timed step: the concatenation stays out of the timed region
    exact, reference_err = train_oracle
    record_and_check(benchmark, impl=train_impl, case=f"{size.config} batch {size.batch} train step",
                     gflop=3 * forward_gflop(size.config, size.batch), images=size.batch, output=grads, oracle=exact,
                     settings=bench_settings, ceiling=matmul_ceiling, model=size.config, reference_err=reference_err)


def interleaved_ratios(config_name: str, batch: int, rounds: int, device: torch.device, dtype: torch.dtype,
                       modes: tuple[str, ...] = ("forward", "train")) -> dict[str, dict[str, float]]:
    """Time every (mode, impl) case and every GEMM route of the ceiling once per round, in turn, for ``rounds``
    rounds (after a warm-up round that also compiles).

    Returns ``{"<mode> <impl>": {"seconds", "gflops", "x_reference", "x_reference_compile", "frac_ceiling"},
    "ceiling <route>": {"seconds", "gflops"}}``: medians over rounds, each ratio taken within a round, the ceiling of
    a round being its fastest route over the model's linear shapes (``benchmarks.common.gemm_shapes``).
    """
    x, t, y = make_inputs(config_name, batch, device)
    x = x.to(dtype)
    cases = {f"ceiling {route}": case for route, case in
             ceiling_cases(device, dtype, gemm_shapes(config_name, batch)).items()}
    for impl in TRAIN_IMPLS:
        if "forward" in modes:
            model = impl_model(impl, config_name, device, dtype)
            cases[f"forward {impl}"] = (functools.partial(_no_grad_call, model, x, t, y),
                                        forward_gflop(config_name, batch))
        if "train" in modes:
            trainable = trainable_model(impl, config_name, device, dtype)
            cases[f"train {impl}"] = (functools.partial(_backward, trainable, x, t, y),
                                      3 * forward_gflop(config_name, batch))
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(rounds + 1):  # round 0 warms up (and compiles)
        for name, (fn, _) in cases.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_:
                seconds[name].append(time.perf_counter() - start)
    ceiling_names = [name for name in cases if name.startswith("ceiling ")]
    ceiling_per_round = [max(cases[c][1] / seconds[c][r] for c in ceiling_names) for r in range(rounds)]
    result: dict[str, dict[str, float]] = {}
    for name, (_, gflop) in cases.items():
        times = seconds[name]
        row = {"seconds": statistics.median(times), "gflops": gflop / statistics.median(times)}
        if not name.startswith("ceiling "):
            mode = name.split()[0]
            base, base_c = seconds[f"{mode} reference"], seconds[f"{mode} reference+compile"]
            row["x_reference"] = statistics.median(r / s for r, s in zip(base, times, strict=True))
            row["x_reference_compile"] = statistics.median(r / s for r, s in zip(base_c, times, strict=True))
            row["frac_ceiling"] = statistics.median(gflop / (s * c)
                                                    for c, s in zip(ceiling_per_round, times, strict=True))
        result[name] = row
    return result


def _no_grad_call(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.test_bench_model",
                                     description="Interleaved model-level speed-ups (median of per-round ratios).")
    parser.add_argument("--config", default=None, help="model config (default DiT-S/2 on cpu, DiT-XL/2 on cuda)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8 on cpu, 64 on cuda)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on cpu, bf16 on cuda), fp32, bf16, fp16")
    parser.add_argument("--forward-only", action="store_true", help="time inference forwards only (no train steps)")
    args = parser.parse_args(argv)
    settings = BenchSettings.from_options(device=args.device, dtype=args.dtype, config=args.config)
    config_name = settings.config or ("DiT-XL/2" if settings.kind == "cuda" else "DiT-S/2")
    batch = args.batch or (64 if settings.kind == "cuda" else 8)
    modes = ("forward",) if args.forward_only else ("forward", "train")
    load = os.getloadavg()
    result = interleaved_ratios(config_name, batch, args.rounds, settings.device, settings.dtype, modes)
    print(f"{config_name} batch {batch} {settings.dtype_name} on {settings.device}, {args.rounds} interleaved rounds; "
          f"load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    for name, row in result.items():
        if name.startswith("ceiling "):
            print(f"{name:<28} {row['seconds']:>9.3f} s {row['gflops']:>8.1f} GFLOP/s (median)")
    print(f"{'case':<28} {'median s':>9} {'GFLOP/s':>8} {'x ref':>7} {'x ref+compile':>14} {'of ceiling':>11}")
    for name, row in result.items():
        if not name.startswith("ceiling "):
            print(f"{name:<28} {row['seconds']:>9.3f} {row['gflops']:>8.1f} {row['x_reference']:>6.2f}x "
                  f"{row['x_reference_compile']:>13.2f}x {row['frac_ceiling']:>10.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
