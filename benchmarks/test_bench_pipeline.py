"""diffusers pipeline level: one whole ``DiTPipeline`` call, as is and after ``dit_fast.accelerate(pipe)``.

Group "diffusers pipeline" compares, on the same weights, noise and labels: the pipeline as diffusers ships it
("diffusers": its ``DiTTransformer2DModel``, whose per-block timestep/label embedder copies differ, as in a DiT built
or trained in diffusers), the same pipeline after ``dit_fast.accelerate`` ("dit_fast", per-block conditioning) and
after ``dit_fast.accelerate(pipe, compile=True)`` ("dit_fast+compile"), and the plain reference DiT (diffusers'
numerics) behind the same adapter ("reference", the fp32 oracle every case's images are checked against). The
pipeline runs DDIM with guidance scale 1.5 (each step one transformer forward over the doubled batch, diffusers'
all-eps-channel guidance) and decodes with a tiny random ``AutoencoderKL`` (one 8-channel block: a few ms, so the
timings are the transformer's and the pipeline's own per-step work: scheduler, guidance, concatenations).

Sizes: on a CPU DiT-S/2 (32x32x4 latents) at batch 4 with DDIM-3; on a GPU DiT-XL/2 at batch 4 with DDIM-50
(``--dit-config``, ``--dit-batch``, ``--dit-ddim-steps`` override). images/s = batch / median time of one call.

pytest-benchmark times one implementation after another; on a shared machine a change of load between cases skews
their ratios. ``python -m benchmarks.test_bench_pipeline`` times the same pipelines interleaved (each round calls
every implementation once, in turn) and prints the median over rounds of each round's speed-up over diffusers::

    OMP_NUM_THREADS=1 python -m benchmarks.test_bench_pipeline --rounds 7

``--profile`` prints instead where one transformer forward of the guided step spends its time (``torch.profiler``):
the GEMM, attention and other shares of the wall time of diffusers' transformer and of the accelerated one, with the
Amdahl bound of a speed-up that leaves the GEMMs as they are (wall / GEMM time), and the top ops.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from benchmarks.common import (
    BenchSettings,
    MatmulCeiling,
    forward_gflop,
    import_or_skip,
    record_and_check,
    reference_model,
    run_timed,
    settings_from_config,
    synchronize,
)
from dit_fast.models.config import get_config
from dit_fast.reference import DiT
from dit_fast.utils.hardware import strict_fp32

PIPELINE_IMPLS = ("reference", "dit_fast", "dit_fast+compile", "diffusers")
CFG_SCALE = 1.5
# A sampling chain accumulates the per-step error: its bound is this many times the single-forward dtype bound.
CHAIN_TOLERANCE_SCALE = 10.0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pipeline_impl" in metafunc.fixturenames:
        settings = settings_from_config(metafunc.config)
        metafunc.parametrize("pipeline_impl", [i for i in PIPELINE_IMPLS if settings.wants(i)])


@dataclass(frozen=True)
class PipelineCase:
    """One ``DiTPipeline`` call: DDIM with ``steps`` steps over ``batch`` images of ``config``, guidance 1.5."""

    config: str
    batch: int
    steps: int
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.config} batch {self.batch} DDIM-{self.steps} cfg {CFG_SCALE} (diffusers DiTPipeline)"

    @property
    def gflop(self) -> float:
        """Transformer work of one call: one forward over the doubled (guided) batch per step (VAE excluded)."""
        return self.steps * forward_gflop(self.config, 2 * self.batch)

    @property
    def labels(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, get_config(self.config).num_classes, (self.batch,), generator=gen).tolist()

    def run(self, pipe: Any) -> torch.Tensor:
        """One pipeline call from the case's generator: -> images (B, 3, H, W) in [0, 1], fp32."""
        out = pipe(class_labels=self.labels, guidance_scale=CFG_SCALE, num_inference_steps=self.steps,
                   generator=torch.Generator().manual_seed(self.seed), output_type="pt")
        return out.images.float()


def pipeline_case(settings: BenchSettings) -> PipelineCase:
    size = settings.sizing("sampling")
    return PipelineCase(size.config, size.batch, settings.ddim_steps, settings.seed)


def _tiny_vae(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random one-block AutoencoderKL in the pipeline's dtype (the pipeline decodes latents of the transformer's
    dtype)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    return vae.to(device, dtype).eval().requires_grad_(False)


@functools.lru_cache(maxsize=8)
def pipeline(impl: str, config_name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A ``DiTPipeline`` of ``config_name`` with the benchmark reference's weights, served by ``impl``.

    Cached per session (a compiled pipeline compiles once). Skips the calling case without diffusers.
    """
    if impl not in PIPELINE_IMPLS:
        raise ValueError(f"unknown pipeline implementation {impl!r}; known: {', '.join(PIPELINE_IMPLS)}")
    diffusers = import_or_skip("diffusers", "the diffusers pipeline benchmark")
    checkpoints = import_or_skip("dit_fast.checkpoints", "the diffusers pipeline benchmark (weights converter)")
    accel = import_or_skip("dit_fast.sampling.diffusers_pipeline", "the diffusers pipeline benchmark")
    adapter = import_or_skip("dit_fast.sampling.diffusers_model", "the diffusers pipeline benchmark")
    reference = reference_model(config_name, device, seed)
    config = reference.config
    try:
        hf_config = checkpoints.to_diffusers_config(config)
    except checkpoints.CheckpointError as e:
        pytest.skip(f"diffusers: {e}")
    with torch.device(device):
        transformer = diffusers.DiTTransformer2DModel.from_config(hf_config)
    transformer.load_state_dict(checkpoints.to_diffusers_state_dict(reference.state_dict(), config), strict=True)
    _perturb_embedder_copies(transformer, seed)
    if dtype != torch.float32:  # (diffusers warns on every dtype cast)
        transformer = transformer.to(dtype)
    transformer = transformer.eval().requires_grad_(False)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_tiny_vae(device, dtype),
                                 scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    if impl == "reference":  # the plain reference DiT in diffusers' numerics, fp32, behind the same adapter
        diffusers_sd = transformer.float().state_dict()
        per_block = checkpoints.with_diffusers_conditioning(diffusers_sd, config.replace(numerics="diffusers"))
        with torch.device(device):
            plain = DiT.from_config(per_block)
        plain.load_state_dict(checkpoints.from_diffusers_state_dict(diffusers_sd, per_block)[0], strict=True)
        pipe.transformer = adapter.DiffusersDiT(plain.eval().requires_grad_(False), transformer.config)
    elif impl != "diffusers":
        accel.accelerate(pipe, compile=impl.endswith("+compile"))
    return pipe


def _perturb_embedder_copies(transformer: torch.nn.Module, seed: int) -> None:
    """Give every block its own timestep/label embedder copy (diffusers draws one per block; training moves each)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            for p in block.norm1.emb.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))


@pytest.fixture(scope="module")
def pipeline_oracle(bench_settings: BenchSettings) -> torch.Tensor:
    """The images of the fp32 plain-reference pipeline for the run's case."""
    case = pipeline_case(bench_settings)
    with strict_fp32():
        return case.run(pipeline("reference", case.config, bench_settings.device, torch.float32, case.seed))


def test_pipeline(benchmark, bench_settings: BenchSettings, matmul_ceiling: MatmulCeiling, pipeline_oracle,
                  pipeline_impl: str) -> None:
    """Time one whole ``DiTPipeline`` call of ``pipeline_impl``; its images must match the fp32 reference's."""
    case = pipeline_case(bench_settings)
    benchmark.group = "diffusers pipeline"
    device = bench_settings.device
    dtype = torch.float32 if pipeline_impl == "reference" else bench_settings.dtype
    pipe = pipeline(pipeline_impl, case.config, device, dtype, case.seed)
    images = run_timed(benchmark, lambda: case.run(pipe), device, bench_settings.sizing("sampling").rounds)
    record_and_check(benchmark, impl=pipeline_impl, case=case.label, gflop=case.gflop, images=case.batch,
                     output=images, oracle=pipeline_oracle, settings=bench_settings, ceiling=matmul_ceiling,
                     model=case.config, tolerance_scale=CHAIN_TOLERANCE_SCALE, steps=case.steps, sampler="ddim",
                     cfg_scale=CFG_SCALE)


def interleaved_speedups(case: PipelineCase, rounds: int, device: torch.device, dtype: torch.dtype,
                         impls: tuple[str, ...] = ("diffusers", "dit_fast", "dit_fast+compile")
                         ) -> dict[str, dict[str, float]]:
    """Call every pipeline once per round, in turn, for ``rounds`` rounds after a warm-up round.

    Returns ``{impl: {"seconds": median, "x_diffusers": median over rounds of that round's diffusers time / this
    impl's, "max_abs_diff": largest image difference from the diffusers pipeline's images}}``.
    """
    pipes = {impl: pipeline(impl, case.config, device, dtype, case.seed) for impl in impls}
    calls: dict[str, Callable[[], torch.Tensor]] = {impl: functools.partial(case.run, pipe)
                                                    for impl, pipe in pipes.items()}
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    images: dict[str, torch.Tensor] = {}
    for round_ in range(rounds + 1):  # round 0 warms up (and compiles)
        for impl, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            images[impl] = call()
            synchronize(device)
            if round_:
                seconds[impl].append(time.perf_counter() - start)
    base = seconds["diffusers"]
    return {impl: {"seconds": statistics.median(times),
                   "x_diffusers": statistics.median(b / s for b, s in zip(base, times, strict=True)),
                   "max_abs_diff": (images[impl] - images["diffusers"]).abs().max().item()}
            for impl, times in seconds.items()}


def profile_forward(case: PipelineCase, impl: str, device: torch.device, dtype: torch.dtype,
                    calls: int = 5) -> dict[str, Any]:
    """Where one transformer forward of the pipeline's guided step (2 x batch latents) spends its time.

    Returns ``{"wall_ms": median of ``calls`` unprofiled forwards, **benchmarks.profiling.profile_summary}`` (op
    self times per forward, category shares of them, top ops).
    """
    from benchmarks.profiling import profile_summary

    transformer = pipeline(impl, case.config, device, dtype, case.seed).transformer
    size, n = transformer.config.sample_size, 2 * case.batch
    x = torch.randn(n, transformer.config.in_channels, size, size, generator=torch.Generator().manual_seed(case.seed))
    x = x.to(device, dtype)
    t = torch.full((n,), 500, device=device)
    y = torch.tensor(case.labels + [transformer.config.num_embeds_ada_norm] * case.batch, device=device)
    forward = functools.partial(transformer, x, timestep=t, class_labels=y)
    with torch.no_grad():
        forward(), forward()  # warm-up
        seconds = []
        for _ in range(calls):
            synchronize(device)
            start = time.perf_counter()
            forward()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        summary = profile_summary(forward, device, steps=calls, top=8)
    return {"wall_ms": 1e3 * statistics.median(seconds), **summary}


def render_profiles(profiles: dict[str, dict[str, Any]]) -> str:
    """Markdown: per implementation the wall time, the GEMM / attention / other time and shares of the wall time, the
    Amdahl bounds of a speed-up that leaves the GEMMs (and attention) as they are; then each one's top ops."""
    lines = ["| impl | wall ms | op ms | GEMM ms | GEMM share | attention share | rest share | bound, GEMMs kept | "
             "bound, GEMMs + attention kept |", "|---|---|---|---|---|---|---|---|---|"]
    for impl, prof in profiles.items():
        wall, op = prof["wall_ms"], prof["total_ms"]
        gemm, attention = op * prof["shares"]["gemm"], op * prof["shares"]["attention"]
        lines.append(f"| {impl} | {wall:.1f} | {op:.1f} | {gemm:.1f} | {gemm / wall:.1%} | {attention / wall:.1%} | "
                     f"{1 - (gemm + attention) / wall:.1%} | {wall / gemm:.2f}x | {wall / (gemm + attention):.2f}x |")
    for impl, prof in profiles.items():
        lines += ["", f"{impl}: top ops (self time per forward)", "",
                  "| op | category | ms | share of op time | calls |", "|---|---|---|---|---|"]
        lines += [f"| `{row['name']}` | {row['category']} | {row['ms']:.1f} | {row['share']:.1%} | {row['calls']} |"
                  for row in prof["top"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.test_bench_pipeline",
                                     description="Interleaved DiTPipeline speed-ups of dit_fast.accelerate over "
                                                 "diffusers (median of per-round ratios).")
    parser.add_argument("--config", default=None, help="model config (default DiT-S/2 on cpu, DiT-XL/2 on cuda)")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 3 on cpu, 50 on cuda)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on cpu, bf16 on cuda), fp32, bf16, fp16")
    parser.add_argument("--no-compile", action="store_true", help="leave out dit_fast+compile")
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler shares of one transformer forward (diffusers, dit_fast)")
    args = parser.parse_args(argv)
    settings = BenchSettings.from_options(device=args.device, dtype=args.dtype, config=args.config,
                                          batch=args.batch, ddim_steps=args.steps)
    case = pipeline_case(settings)
    if args.profile:
        print(f"{case.label}: one transformer forward over {2 * case.batch} latents, {settings.dtype_name} on "
              f"{settings.device}, {torch.get_num_threads()} threads\n")
        print(render_profiles({impl: profile_forward(case, impl, settings.device, settings.dtype, args.rounds)
                               for impl in ("diffusers", "dit_fast")}))
        return 0
    impls = ("diffusers", "dit_fast") if args.no_compile else ("diffusers", "dit_fast", "dit_fast+compile")
    result = interleaved_speedups(case, args.rounds, settings.device, settings.dtype, impls)
    print(f"{case.label}, {settings.dtype_name} on {settings.device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    print(f"{'impl':<18} {'median s':>9} {'images/s':>9} {'x diffusers':>12} {'max |image diff|':>17}")
    for impl, row in result.items():
        print(f"{impl:<18} {row['seconds']:>9.3f} {case.batch / row['seconds']:>9.2f} {row['x_diffusers']:>11.2f}x "
              f"{row['max_abs_diff']:>17.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
