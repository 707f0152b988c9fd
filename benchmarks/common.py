"""Shared pieces of the benchmark suite: run sizing, the implementations, timing, the matmul ceiling, parity.

Every case follows one pattern (``bench_settings`` and ``matmul_ceiling`` are session fixtures of conftest.py)::

    def test_forward(benchmark, bench_settings, matmul_ceiling, impl):
        size = bench_settings.sizing("model")                    # config, batch and rounds of this level
        model = impl_model(impl, size.config, bench_settings.device, bench_settings.dtype)  # skips if unavailable
        x, t, y = make_inputs(size.config, size.batch, bench_settings.device)
        out = run_timed(benchmark, lambda: model(x, t, y), bench_settings.device, size.rounds)
        oracle = oracle_model(size.config, bench_settings.device, model.numerics)(x, t, y)
        record_and_check(benchmark, impl=impl, case=f"{size.config} batch {size.batch}",
                         gflop=forward_gflop(size.config, size.batch), images=size.batch, output=out,
                         oracle=oracle, settings=bench_settings, ceiling=matmul_ceiling, model=size.config)

``record_and_check`` fills ``benchmark.extra_info`` (keys below) and then fails the case when its output is
further from the fp32 reference than its dtype allows: the suite checks parity while it measures.

``extra_info`` keys (every case records them; ``benchmarks.report`` reads them):

- ``impl``: one of ``IMPLS`` (or "matmul" for the ceiling case); ``case``: what was run, shared by the
  implementations compared (e.g. "DiT-S/2 batch 1 DDPM-6 cfg 1.5");
- ``gflop``: hardware work of one timed call in GFLOP (2 x multiply-adds); ``gflops``: achieved GFLOP/s at the
  median time; ``images`` / ``images_per_s``: images produced (or processed) per call and per second;
- ``max_rel_err``: ``max|out - oracle| / max|oracle|`` against the fp32 plain reference on the same inputs;
  ``tolerance`` and ``parity_ok``: the bound it was held to and whether it passed;
- ``model`` / ``model_gflops``: config name and its per-image forward cost in the paper's convention
  (multiply-add = 1 flop, ``dit_fast.gflops``);
- ``ceiling_gflops``, ``ceiling_route``: the GEMM ceiling measured in the same run in the case's dtype (the fastest
  route over the model's linear shapes, ``measure_matmul_ceiling``); ``frac_ceiling`` = gflops / ceiling_gflops;
  on a GPU also ``mfu`` (the same ratio, the usual name there) and, for GPUs with a known datasheet, ``mfu_datasheet``
  (against NVIDIA's dense bf16/fp16 tensor-core peak from ``dit_fast.utils.hardware``: an upper bound no kernel
  reaches);
- ``dtype``, ``device``; optionally ``seconds`` (the time of one call, when a benchmark round is not one call, e.g.
  one ``triton.testing.do_bench``; the report then uses it instead of the round's median) and ``gbps`` (achieved
  GB/s of a memory-bound case).
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.impls import IMPLS as _IMPLS
from dit_fast.kernels.linear import onednn_linear, onednn_supports
from dit_fast.models.config import CONFIGS, DiTConfig, get_config, gflops
from dit_fast.reference import DiT
from dit_fast.utils.hardware import DTYPES, peak_flops

# -------------------------------------------------------------------------------------------------- run sizing

# Parity bound per dtype: norm-wise relative error against the fp32 reference (see ``parity_tolerance``).
DTYPE_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}

# Implementations compared in each group (``benchmarks.impls``), in report order; "reference" is the baseline.
IMPLS: tuple[str, ...] = _IMPLS


@dataclass(frozen=True)
class LevelSize:
    """How big one level's cases are: the model config (None for a sweep over configs), batch and timed rounds."""

    config: str | None
    batch: int
    rounds: int


# Defaults per level and device kind. CPU sizes are reduced so the whole suite finishes in minutes on 2 cores;
# CUDA sizes are the paper's (DiT-XL/2 at 256x256). Every value can be overridden from the command line. On a CPU,
# guided sampling at batch 4 calls the model on the same (8, 4, 32, 32) batch as the model level's forward, so the
# compiled models of that level are reused, not compiled again (``impl_model`` caches them).
LEVEL_DEFAULTS: dict[str, dict[str, LevelSize]] = {
    "model": {"cpu": LevelSize("DiT-S/2", 8, 3), "cuda": LevelSize("DiT-XL/2", 64, 10)},
    "sampling": {"cpu": LevelSize("DiT-S/2", 4, 1), "cuda": LevelSize("DiT-XL/2", 4, 1)},
    "scaling": {"cpu": LevelSize(None, 2, 3), "cuda": LevelSize(None, 16, 10)},
}
SCALING_CONFIGS: dict[str, tuple[str, ...]] = {
    "cpu": ("DiT-S/8", "DiT-S/4", "DiT-S/2", "DiT-B/8"),
    "cuda": tuple(CONFIGS),
}
# (DDPM steps, DDIM steps) of the sampling level: the paper's 250-step DDPM and DDIM-50 on a GPU.
SAMPLE_STEPS: dict[str, tuple[int, int]] = {"cpu": (6, 3), "cuda": (250, 50)}


@dataclass(frozen=True)
class BenchSettings:
    """One run's sizing, from the ``--dit-*`` options (``BenchSettings.from_options``).

    ``config``, ``batch`` and ``rounds`` are explicit overrides (None: the level's default, see ``sizing``);
    every other field is already resolved.
    """

    device: torch.device
    dtype: torch.dtype
    config: str | None
    batch: int | None
    rounds: int | None
    ddpm_steps: int
    ddim_steps: int
    scaling_configs: tuple[str, ...]
    impls: tuple[str, ...]
    seed: int = 0

    @property
    def kind(self) -> str:
        """The device kind, "cuda" or "cpu": the key of ``LEVEL_DEFAULTS`` and friends."""
        return "cuda" if self.device.type == "cuda" else "cpu"

    @property
    def dtype_name(self) -> str:
        return next(name for name, dt in DTYPES.items() if dt == self.dtype)

    def sizing(self, level: str) -> LevelSize:
        """The config, batch and rounds of ``level`` ("model", "sampling", "scaling"), overrides applied."""
        if level not in LEVEL_DEFAULTS:
            raise ValueError(f"unknown benchmark level {level!r}; known: {sorted(LEVEL_DEFAULTS)}")
        default = LEVEL_DEFAULTS[level][self.kind]
        return LevelSize(
            config=default.config if default.config is None or self.config is None else self.config,
            batch=self.batch or default.batch,
            rounds=self.rounds or default.rounds,
        )

    def wants(self, impl: str) -> bool:
        return impl in self.impls

    @classmethod
    def from_options(cls, *, device: str = "auto", dtype: str = "auto", config: str | None = None,
                     batch: int | None = None, rounds: int | None = None, ddpm_steps: int | None = None,
                     ddim_steps: int | None = None, scaling_configs: str | None = None,
                     impls: str | None = None) -> BenchSettings:
        """Validate and resolve the command-line options; raises ValueError naming the bad option."""
        if device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                dev = torch.device(device)
            except RuntimeError as e:
                raise ValueError(f"--dit-device {device!r} is not a device: {e}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--dit-device {device}: torch {torch.__version__} sees no CUDA device")
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"--dit-device {device}: only cpu and cuda are supported")
        kind = "cuda" if dev.type == "cuda" else "cpu"
        if dtype == "auto":
            dt = torch.bfloat16 if kind == "cuda" else torch.float32
        elif dtype in DTYPES:
            dt = DTYPES[dtype]
        else:
            raise ValueError(f"--dit-dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
        if config is not None:
            config = _config_name(config, "--dit-config")
        for name, value in (("--dit-batch", batch), ("--dit-rounds", rounds), ("--dit-sample-steps", ddpm_steps),
                            ("--dit-ddim-steps", ddim_steps)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if scaling_configs:
            sweep = tuple(_config_name(c.strip(), "--dit-scaling-configs") for c in scaling_configs.split(","))
        else:
            sweep = SCALING_CONFIGS[kind]
        if impls:
            chosen = tuple(i.strip() for i in impls.split(","))
            unknown = [i for i in chosen if i not in IMPLS]
            if unknown:
                raise ValueError(f"--dit-impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
        else:
            chosen = IMPLS
        default_ddpm, default_ddim = SAMPLE_STEPS[kind]
        return cls(device=dev, dtype=dt, config=config, batch=batch, rounds=rounds,
                   ddpm_steps=ddpm_steps or default_ddpm, ddim_steps=ddim_steps or default_ddim,
                   scaling_configs=sweep, impls=chosen)


_SETTINGS_KEY = pytest.StashKey[BenchSettings]()


def settings_from_config(config: pytest.Config) -> BenchSettings:
    """The run's ``BenchSettings`` from the ``--dit-*`` options (resolved once, then stashed on the config).

    For ``pytest_generate_tests`` hooks, which parametrize before fixtures exist; bad options raise
    ``pytest.UsageError`` naming the option.
    """
    if _SETTINGS_KEY not in config.stash:
        try:
            config.stash[_SETTINGS_KEY] = BenchSettings.from_options(
                device=config.getoption("dit_device"), dtype=config.getoption("dit_dtype"),
                config=config.getoption("dit_config"), batch=config.getoption("dit_batch"),
                rounds=config.getoption("dit_rounds"), ddpm_steps=config.getoption("dit_sample_steps"),
                ddim_steps=config.getoption("dit_ddim_steps"),
                scaling_configs=config.getoption("dit_scaling_configs"), impls=config.getoption("dit_impls"),
            )
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None
    return config.stash[_SETTINGS_KEY]


def _config_name(name: str, option: str) -> str:
    """The canonical zoo name ("DiT-XL/2") of ``name`` (which may be spelled "DiT-XL-2")."""
    try:
        config = get_config(name)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None
    return next(canonical for canonical, c in CONFIGS.items() if c == config)


# -------------------------------------------------------------------------------------------------- models


@dataclass
class ModelImpl:
    """One implementation of the DiT forward: ``impl(x (N, C, H, W), t (N,), y (N,)) -> (N, out_channels, H, W)``.

    ``numerics`` is the function it computes ("official", or "diffusers" for diffusers' port): parity is checked
    against the fp32 reference with the same numerics (``oracle_model``).
    """

    impl: str
    module: nn.Module
    config: DiTConfig
    dtype: torch.dtype
    numerics: str
    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.call(x.to(self.dtype), t, y)


def randomize_zero_init(model: nn.Module, seed: int) -> nn.Module:
    """Replace the paper's zero init (adaLN-Zero, final layer, biases) by small random values, in place.

    A freshly initialised DiT outputs exactly zero, which makes a benchmark's parity check vacuous: every
    all-zero matrix gets Xavier-uniform values and every all-zero vector N(0, 0.02), so each block and the final
    layer contribute to the output.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.count_nonzero() == 0:
                values = torch.empty(p.shape, dtype=torch.float32)
                if p.dim() >= 2:
                    bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5
                    values.uniform_(-bound, bound, generator=gen)
                else:
                    values.normal_(0.0, 0.02, generator=gen)
                p.copy_(values)
    return model


@functools.lru_cache(maxsize=4)
def reference_model(config_name: str, device: torch.device, seed: int = 0) -> nn.Module:
    """The plain fp32 reference ``DiT`` for ``config_name`` on ``device``, eval mode, with deterministic random
    weights (``seed``; zero-init layers randomized). Every implementation loads these weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiT.from_config(get_config(config_name))
    return randomize_zero_init(model, seed).eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def oracle_model(config_name: str, device: torch.device, numerics: str = "official", seed: int = 0) -> nn.Module:
    """The fp32 plain reference computing ``numerics`` ("official" or "diffusers") with the shared weights."""
    reference = reference_model(config_name, device, seed)
    if numerics == "official":
        return reference
    with torch.device(device):
        model = DiT.from_config(get_config(config_name, numerics=numerics))
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval().requires_grad_(False)


def build_model(config: DiTConfig, device: torch.device, dtype: torch.dtype = torch.float32, *, fast: bool,
                kernels: str = "auto", attention: str = "auto", state_dict: dict[str, torch.Tensor] | None = None,
                seed: int = 0) -> nn.Module:
    """The suite's one model factory: the plain reference ``DiT`` (``fast=False``) or ``DiTFast`` (with ``kernels``
    and ``attention``) of ``config`` on ``device``, in eval mode without gradients, its weights ``state_dict`` (else
    the paper's init seeded by ``seed``), cast once to ``dtype`` as sampling does (``DiTFast.for_inference``: bf16
    weights, fp32 residual stream; the reference: ``.to(dtype)``)."""
    from dit_fast.models.dit import DiTFast

    torch.manual_seed(seed)
    with torch.device(device):
        model = (DiTFast.from_config(config, kernels=kernels, attention=attention) if fast
                 else DiT.from_config(config))
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    if isinstance(model, DiTFast):
        return model.for_inference(dtype)
    return model.to(dtype).eval().requires_grad_(False)


def import_or_skip(module: str, what: str) -> Any:
    """Import ``module`` or skip the calling case, naming ``what`` needs it and why the import failed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{what}: {module} is not importable ({e})")


@functools.lru_cache(maxsize=8)
def impl_model(impl: str, config_name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ModelImpl:
    """``impl`` (one of ``IMPLS``) of ``config_name`` in ``dtype`` on ``device``, with the reference's weights.

    Cached, so a compiled model is compiled once per session and shared by every level that uses the same config,
    device and dtype. Skips the calling case when the implementation is unavailable (module not importable,
    diffusers not installed), with the reason.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")
    if impl.endswith("+compile"):
        eager = impl_model(impl.removesuffix("+compile"), config_name, device, dtype, seed)
        if eager.impl == "dit_fast":  # DiTFast's own compile(): in place and regional (each block's graph shared)
            module = copy.deepcopy(eager.module).compile()
            return ModelImpl(impl, module, eager.config, dtype, eager.numerics, module)
        module = compile_regionally(copy.deepcopy(eager.module))
        return ModelImpl(impl, module, eager.config, dtype, eager.numerics, module)
    reference = reference_model(config_name, device, seed)
    config = reference.config
    if impl == "reference":
        module = build_model(config, device, dtype, fast=False, state_dict=reference.state_dict())
        return ModelImpl(impl, module, config, dtype, "official", module)
    if impl == "dit_fast":
        import_or_skip("dit_fast.models.dit", "the dit_fast implementation")
        # kernels/attention "auto": the best available here; bf16/fp16 weights cast once, fp32 residual stream
        module = build_model(config, device, dtype, fast=True, state_dict=reference.state_dict())
        return ModelImpl(impl, module, config, dtype, "official", module)
    # diffusers' DiTTransformer2DModel with the same weights, through our converter.
    if importlib.util.find_spec("diffusers") is None:
        pytest.skip("the diffusers implementation needs diffusers (pip install 'dit-fast[diffusers]')")
    checkpoints = import_or_skip("dit_fast.checkpoints", "the diffusers implementation (weights converter)")
    from diffusers import DiTTransformer2DModel

    try:
        hf_config = checkpoints.to_diffusers_config(config)
    except checkpoints.CheckpointError as e:
        pytest.skip(f"diffusers: {e}")
    with torch.device(device):
        module = DiTTransformer2DModel.from_config(hf_config)
    module.load_state_dict(checkpoints.to_diffusers_state_dict(reference.state_dict(), config), strict=True)
    module = module.to(dtype).eval().requires_grad_(False)

    def call(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return module(x, timestep=t, class_labels=y, return_dict=False)[0]

    return ModelImpl(impl, module, config, dtype, "diffusers", call)


def compile_regionally(model: nn.Module) -> nn.Module:
    """Compile each transformer block of a reference ``DiT`` (or diffusers' model) in place, as ``DiTFast.compile()``
    does: the blocks share one graph, so an XL/2 compiles in seconds, where a whole-model ``torch.compile`` takes
    40-70 s; the embedders and final layer stay eager. Returns ``model``."""
    blocks = getattr(model, "blocks", None) or getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no blocks to compile")
    for block in blocks:
        block.compile(fullgraph=True, dynamic=False)
    return model


def make_inputs(config_name: str, batch: int, device: torch.device, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic forward inputs (same values on every device): x (B, C, H, W) fp32 N(0, 1) latents,
    t (B,) int64 timesteps in [0, 1000), y (B,) int64 labels in [0, num_classes)."""
    cfg = get_config(config_name)
    h, w = cfg.grid_input
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    return x.to(device), t.to(device), y.to(device)


def forward_gflop(config_name: str, images: int) -> float:
    """Hardware GFLOP (2 x multiply-adds) of one forward over ``images`` images of ``config_name``."""
    return 2.0 * gflops(config_name) * images


# -------------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timed(benchmark: Any, fn: Callable[[], Any], device: torch.device, rounds: int, warmup_rounds: int = 1,
              grad: bool = False) -> Any:
    """Time ``fn()`` with ``benchmark.pedantic`` (``warmup_rounds`` untimed calls, then ``rounds`` timed calls)
    and return the last call's result.

    The timed callable synchronises the device before it returns, so on CUDA each round is the wall time of the
    queued kernels, not of their launch. Gradients are off unless ``grad`` (a training step).
    """

    def call() -> Any:
        with torch.set_grad_enabled(grad):
            out = fn()
        synchronize(device)
        return out

    synchronize(device)
    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def median_seconds(benchmark: Any) -> float | None:
    """Median time of the benchmark's rounds, or None when timing is disabled (``--benchmark-disable``)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(stats.stats.median)


def kernel_seconds(benchmark: Any, call: Callable[[], Any], device: torch.device | str,
                   cpu_rounds: int) -> float | None:
    """Median seconds of one ``call()`` of a single op: on CUDA each of 3 benchmark rounds is one
    ``triton.testing.do_bench`` (its median, in-stream timing with L2 flushes); elsewhere ``cpu_rounds`` timed calls
    after 2 warm-ups. None when timing is disabled."""
    if torch.device(device).type == "cuda":
        import triton.testing

        medians_ms: list[float] = []

        def bench_round() -> None:
            medians_ms.append(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))

        benchmark.pedantic(bench_round, rounds=3, iterations=1)
        return statistics.median(medians_ms) / 1e3
    benchmark.pedantic(call, rounds=cpu_rounds, warmup_rounds=2, iterations=1)
    return median_seconds(benchmark)


# -------------------------------------------------------------------------------------------------- ceiling

# The model level's shapes size the ceiling when a run names none (the scaling sweep shares the model level's).
CEILING_DEFAULT: dict[str, tuple[str, int]] = {"cpu": ("DiT-S/2", 8), "cuda": ("DiT-XL/2", 64)}
GemmRoute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MatmulCeiling:
    """The machine's GEMM ceiling in the run's dtype: the fastest route over the model's own linear shapes, measured
    in the same run as the cases.

    ``gflops``: the best route's throughput (2 x multiply-adds over the best time, a ceiling being the fastest the
    hardware was seen to go, robust to a shared machine's noise) on one pass over ``shapes`` (M, K, N), the distinct
    linears of one forward (qkv, attention projection, fc1, fc2 at M = batch x tokens); ``route``: which route that
    was; ``routes``: every route's GFLOP/s (``gemm_routes``); ``datasheet_gflops``: the GPU's datasheet tensor-core
    peak for bf16/fp16, when known (None on a CPU, in fp32, or for other GPUs).
    """

    gflops: float
    route: str
    routes: dict[str, float]
    shapes: tuple[tuple[int, int, int], ...]
    dtype: torch.dtype
    device: str
    datasheet_gflops: float | None

    def describe(self) -> str:
        """One line: the ceiling, its route and every route's figure."""
        others = ", ".join(f"{name} {value:,.1f}" for name, value in self.routes.items())
        shapes = ", ".join("x".join(map(str, shape)) for shape in self.shapes)
        return (f"{_dtype_name(self.dtype)} GEMM ceiling {self.gflops:,.1f} GFLOP/s ({self.route}) over the model's "
                f"linears (MxKxN {shapes}); routes: {others}")


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, dt in DTYPES.items() if dt == dtype)


def gemm_shapes(config_name: str, batch: int) -> tuple[tuple[int, int, int], ...]:
    """The distinct (M, K, N) of one forward's linears: qkv, attention projection, fc1, fc2 (M = batch x tokens)."""
    cfg = get_config(config_name)
    m, d, hidden = batch * cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    return ((m, d, 3 * d), (m, d, d), (m, d, hidden), (m, hidden, d))


def gemm_routes(device: torch.device, dtype: torch.dtype) -> dict[str, GemmRoute]:
    """The routes a GEMM ``x (M, K) @ w (N, K)^T`` in ``dtype`` can take on ``device``: ``torch.matmul``,
    ``F.linear``, and on the CPU oneDNN's linear in ``dtype`` (where oneDNN supports it) and, for bf16/fp16, oneDNN
    in fp32 on widened operands (the weight widened on every call, as the model does; the result rounded back)."""
    routes: dict[str, GemmRoute] = {"matmul": lambda x, w: x @ w.t(), "F.linear": lambda x, w: F.linear(x, w)}
    if device.type == "cpu":
        if onednn_supports(dtype):
            routes["oneDNN"] = lambda x, w: onednn_linear(x, w, None, False)
        if dtype != torch.float32 and onednn_supports(torch.float32):
            routes["oneDNN fp32-widened"] = lambda x, w: onednn_linear(x.float(), w.float(), None, False).to(x.dtype)
    return routes


def ceiling_cases(device: torch.device, dtype: torch.dtype, shapes: Sequence[tuple[int, int, int]]
                  ) -> dict[str, tuple[Callable[[], None], float]]:
    """Per route: a call running one GEMM of every shape (random N(0, 1) operands), and its GFLOP."""
    gen = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, k, generator=gen).to(device, dtype), torch.randn(n, k, generator=gen).to(device, dtype))
                for m, k, n in shapes]
    gflop = sum(2.0 * m * k * n for m, k, n in shapes) / 1e9

    def case(route: GemmRoute) -> Callable[[], None]:
        def run() -> None:
            for x, w in operands:
                route(x, w)
        return run

    return {name: (case(route), gflop) for name, route in gemm_routes(device, dtype).items()}


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_matmul_ceiling(device: torch.device, dtype: torch.dtype, config_name: str | None = None,
                           batch: int | None = None, repeats: int = 3) -> MatmulCeiling:
    """Best throughput of every route (``gemm_routes``) over the linear shapes of ``config_name`` at ``batch``
    (default: the model level's), after one warm-up each; the routes alternate within each repeat."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    config_name = config_name or CEILING_DEFAULT[kind][0]
    shapes = gemm_shapes(config_name, batch or CEILING_DEFAULT[kind][1])
    cases = ceiling_cases(device, dtype, shapes)
    best = {name: float("inf") for name in cases}
    for repeat in range(repeats + 1):
        for name, (fn, _) in cases.items():
            seconds = _seconds(fn, device)
            if repeat:
                best[name] = min(best[name], seconds)
    routes = {name: cases[name][1] / best[name] for name in cases}
    route = max(routes, key=routes.__getitem__)
    peak = peak_flops(device, dtype) if dtype in (torch.bfloat16, torch.float16) else None
    return MatmulCeiling(gflops=routes[route], route=route, routes=routes, shapes=shapes, dtype=dtype,
                         device=device_name(device), datasheet_gflops=None if peak is None else peak / 1e9)


# -------------------------------------------------------------------------------------------------- recording


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``max|a - e| / max|e|`` in float64 (the definition of tests/helpers.py)."""
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    if a.shape != e.shape:
        raise ValueError(f"output shape {tuple(a.shape)} != reference shape {tuple(e.shape)}")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def parity_tolerance(dtype: torch.dtype, reference_err: float = 0.0, scale: float = 1.0) -> float:
    """The largest ``max_rel_err`` a case in ``dtype`` may show against the fp32 reference.

    ``scale * DTYPE_TOLERANCE[dtype]``, or twice the plain reference's own error in the same dtype when that is
    larger (flash-attention's rule: a fast path may be at most ~2x as far from the exact result as plain PyTorch).
    ``scale`` loosens the bound for long computations (a sampling chain).
    """
    return max(scale * DTYPE_TOLERANCE[dtype], 2.0 * reference_err)


def record_and_check(benchmark: Any, *, impl: str, case: str, gflop: float, images: int | None, output: torch.Tensor,
                     oracle: torch.Tensor, settings: BenchSettings, ceiling: MatmulCeiling, model: str | None = None,
                     reference_err: float = 0.0, tolerance_scale: float = 1.0, **extra: Any) -> None:
    """Fill ``benchmark.extra_info`` (see the module docstring), then fail when ``output`` misses the parity bound.

    ``images`` is how many images one call produces or processes (None for a case without images); ``output`` and
    ``oracle`` are the case's result and the fp32 reference's on the same inputs; ``reference_err``
    is the plain reference's own error in the case's dtype (0 in fp32); ``extra`` adds more keys (e.g. steps).
    """
    err = max_rel_err(output, oracle)
    tol = parity_tolerance(settings.dtype, reference_err, tolerance_scale)
    info: dict[str, Any] = {
        "impl": impl, "case": case, "gflop": gflop, "images": images, "max_rel_err": err, "tolerance": tol,
        "parity_ok": err <= tol, "dtype": settings.dtype_name, "device": str(settings.device),
        "ceiling_gflops": ceiling.gflops, "ceiling_route": ceiling.route,
    }
    if model is not None:
        info.update(model=model, model_gflops=gflops(model))
    median = median_seconds(benchmark)
    if median is not None and median > 0:
        achieved = gflop / median
        info.update(gflops=achieved, frac_ceiling=achieved / ceiling.gflops)
        if images:
            info["images_per_s"] = images / median
        if settings.device.type == "cuda":
            info["mfu"] = achieved / ceiling.gflops
            if ceiling.datasheet_gflops:
                info["mfu_datasheet"] = achieved / ceiling.datasheet_gflops
    info.update(extra)
    benchmark.extra_info.update(info)
    assert err <= tol, (f"{impl} on {case} ({settings.dtype_name}): max_rel_err {err:.3g} against the fp32 reference "
                        f"exceeds the tolerance {tol:.3g}")


# -------------------------------------------------------------------------------------------------- environment


def cpu_model_name() -> str:
    """The CPU's marketing name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def _installed_version(distribution: str) -> str:
    """The installed version of a package, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_info(device: torch.device, packages: Sequence[str] = ("triton", "diffusers")) -> dict[str, Any]:
    """What the report names: CPU model and cores, torch and optional package versions, GPU and driver."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "bench_device": str(device),
    }
    info.update({package: _installed_version(package) for package in packages})
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        if shutil.which("nvidia-smi"):
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30, check=False)
            info["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout else None
    return info
