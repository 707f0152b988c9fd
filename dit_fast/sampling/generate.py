"""Sampling a trained DiT: seeded initial noise, one guided sampler run per batch, NaN/inf detection.

``generate(model, labels, ...)`` seeds sample i's initial noise from (seed, i) (``initial_noise``), wraps the
network in ``diffusion.CFGModel`` (and, on request, a ``models.cuda_graph.CUDAGraphRunner`` or a
``cache.StepCache``), and runs one of the samplers of ``create_diffusion`` per batch: DDPM (the paper's, 250
respaced steps), DDIM or DPM-Solver++(2M); for a flow model (SiT's objective: pass its ``transport``) one of
``FlowSampler``'s (ODE Euler / Heun / dopri5, SDE Euler-Maruyama). With a deterministic sampler (ddim with eta 0,
dpm++) a sample does not depend on the batch size or the number of processes; the DDPM sampler's per-step noise
comes from each batch's generator state (seed, first index of the batch). ``dit-fast sample``
(``dit_fast.commands.sample``) is the command around it; ``dit_fast.sampling.outputs`` writes the PNG grid and the
ADM-evaluator ``.npz``.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from typing import Any

import torch
from tqdm import tqdm

from dit_fast.cache import CachePolicy, parse_cache, step_cache
from dit_fast.checkpoints import load_checkpoint
from dit_fast.diffusion import (
    FLOW_SAMPLERS,
    CFGModel,
    FlowSampler,
    Transport,
    create_diffusion,
    flow_nfe,
)
from dit_fast.diffusion.dpm_solver import dpm_solver_step_indices
from dit_fast.models.cuda_graph import CUDAGraphRunner
from dit_fast.models.dit import DiTFast
from dit_fast.reference import check_labels
from dit_fast.utils.seeds import mix_seed

DIFFUSION_STEPS = 1000  # the diffusion DiT models are trained with (official and ours): timesteps 0..999
SAMPLERS = ("ddpm", "ddim", "dpm++")
"""Samplers of DDPM models; flow models (SiT's objective) take ``FLOW_SAMPLERS``."""


# ---------------------------------------------------------------------------------------------------- sampling
def initial_noise(seed: int, indices: range, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """x_T for the samples ``indices``: (len(indices), *shape), each from its own generator seeded (seed, i)."""
    out = torch.empty((len(indices), *shape))
    for row, i in enumerate(indices):
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(seed, i)))
    return out.to(device)


class NonFiniteMonitor:
    """Wraps a sampling model ``(x, t, y) -> out`` and records the first call whose output holds NaN or inf.

    The record stays on the device (no host sync per step); ``first_bad()`` reads it once: None, or
    ``(call, timestep)`` with ``call`` counted from 1 (a sampling step, for samplers that call the model once per
    step) and ``timestep`` the (first) timestep of that call. ``model`` may be set later (``sample_batch`` sets it
    to the guided network it builds).
    """

    def __init__(self, model: Callable[..., torch.Tensor] | None = None):
        self.model = model
        self._calls: torch.Tensor | None = None  # () int64 on the device: calls so far
        self._first: torch.Tensor | None = None  # (2,) float64: call, time; -1 until a non-finite output

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.model(x, t, y)
        if self._first is None:
            self._calls = torch.zeros((), dtype=torch.int64, device=out.device)
            self._first = torch.full((2,), -1, dtype=torch.float64, device=out.device)
        self._calls += 1
        bad = (self._first[0] < 0) & ~torch.isfinite(out).all()
        here = torch.stack([self._calls.double(), t.reshape(-1)[0].to(device=out.device, dtype=torch.float64)])
        self._first = torch.where(bad, here, self._first)
        return out

    def first_bad(self) -> tuple[int, float] | None:
        if self._first is None:
            return None
        call, time = self._first.tolist()
        return None if call < 0 else (int(call), time)


def sample_batch(model: Callable[..., torch.Tensor], noise: torch.Tensor, labels: torch.Tensor, *,
                 sampler: str = "ddpm", num_steps: int = 250, cfg_scale: float = 1.0,
                 guide_channels: int | str = 3, interval: tuple[float, float] | None = None, null_class: int,
                 clip_denoised: bool = False, diffusion_steps: int = DIFFUSION_STEPS, progress: bool = False,
                 dtype: torch.dtype | None = None, cache: str | CachePolicy | None = None,
                 cache_stats: dict[str, int] | None = None, monitor: NonFiniteMonitor | None = None,
                 transport: Transport | None = None, flow_options: dict[str, Any] | None = None) -> torch.Tensor:
    """Run one sampler from ``noise`` (N, C, H, W) for ``labels`` (N,): -> samples (N, C, H, W) float32.

    ``model(x, t, y)`` is the network (a DiT, a ``CUDAGraphRunner`` or any callable). Guidance (``cfg_scale`` > 1)
    runs through ``dit_fast.diffusion.CFGModel``: one doubled pass per step, through the model's own
    ``forward_with_cfg`` when it has one. The network takes its input in ``dtype`` (its weights' dtype: None keeps
    the sampler's fp32) and its output is widened to fp32: the sampler's arithmetic stays fp32, no autocast.
    ``cache`` is a step-caching policy (``dit_fast.cache``; needs a DiT module);
    ``cache_stats``, when given, has its "full_steps" and "cached_steps" counts increased by this run's.
    ``monitor`` (a ``NonFiniteMonitor``) watches the guided network's outputs. A flow model (``transport``, the
    objective it was trained with) takes one of ``FLOW_SAMPLERS`` (``flow_options`` go to it, e.g. ``last_step``).
    """
    check_sampler(sampler, transport)
    guided = CFGModel(model, cfg_scale, null_class, guide_channels=guide_channels, interval=interval)
    device = noise.device

    def network(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return guided(x if dtype is None else x.to(dtype), t, y).float()

    call: Callable[..., torch.Tensor] = network
    if monitor is not None:
        monitor.model = network
        call = monitor
    kwargs = {"noise": noise, "clip_denoised": clip_denoised, "model_kwargs": {"y": labels}, "device": device,
              "progress": progress}
    shape = tuple(noise.shape)
    with step_cache(model, cache, network_calls(sampler, num_steps, flow_options)) as session:
        if transport is not None:
            out = FlowSampler(transport).sample(call, noise, {"y": labels}, sampler=sampler, num_steps=num_steps,
                                                progress=progress, **(flow_options or {}))
            out = out.clamp(-1, 1) if clip_denoised else out
        elif sampler == "ddpm":
            out = create_diffusion(str(num_steps), diffusion_steps=diffusion_steps).p_sample_loop(
                call, shape, **kwargs)
        elif sampler == "ddim":
            out = create_diffusion(str(num_steps), diffusion_steps=diffusion_steps).ddim_sample_loop(
                call, shape, **kwargs)
        else:
            out = create_diffusion("", diffusion_steps=diffusion_steps).dpm_solver_sample_loop(
                call, shape, num_steps=num_steps, **kwargs)
    if session is not None and cache_stats is not None:
        cache_stats["full_steps"] = cache_stats.get("full_steps", 0) + session.full_steps
        cache_stats["cached_steps"] = cache_stats.get("cached_steps", 0) + session.cached_steps
    return out


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (fp32 for a model without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def cast_for_sampling(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """``model`` itself when ``dtype`` is None or its weights' dtype, else a copy cast once to ``dtype`` for
    inference (``DiTFast.for_inference``: fp32 residual stream; other modules: ``.to(dtype)``), in eval mode."""
    if dtype is None or weights_dtype(model) == dtype:
        return model
    cast = deepcopy(model)
    if isinstance(cast, DiTFast):
        return cast.for_inference(dtype)
    return cast.eval().requires_grad_(False).to(dtype)


def check_sampler(sampler: str, transport: Transport | None) -> None:
    """ValueError unless ``sampler`` belongs to the model's objective (flow when ``transport`` is given)."""
    family, other = (FLOW_SAMPLERS, SAMPLERS) if transport is not None else (SAMPLERS, FLOW_SAMPLERS)
    if sampler not in family:
        kind = "a flow" if transport is not None else "a DDPM"
        hint = f" ({sampler} is for {'DDPM' if transport is not None else 'flow'} models)" if sampler in other else ""
        raise ValueError(f"sampler {sampler!r} cannot sample {kind} model{hint}; choose one of {', '.join(family)}")


def model_timesteps(sampler: str, num_steps: int, diffusion_steps: int = DIFFUSION_STEPS) -> list[int]:
    """The timesteps (of the full ``diffusion_steps`` schedule) a DDPM-family sampler calls the network at, ascending,
    read from the diffusion ``sample_batch`` builds for it: the respaced steps of DDPM and DDIM, DPM-Solver++'s grid."""
    if sampler == "dpm++":
        diffusion = create_diffusion("", diffusion_steps=diffusion_steps)
        return sorted({diffusion.timestep_map[i] for i in dpm_solver_step_indices(diffusion.alphas_cumprod, num_steps)})
    return sorted(create_diffusion(str(num_steps), diffusion_steps=diffusion_steps).timestep_map)


def network_calls(sampler: str, num_steps: int, flow_options: dict[str, Any] | None = None) -> int:
    """Network evaluations of one run (what ``--cache auto`` selects by); an adaptive dopri5 counts as many."""
    if sampler not in FLOW_SAMPLERS:
        return num_steps
    return flow_nfe(sampler, num_steps, (flow_options or {}).get("last_step", "Mean")) or 10**6


def sampling_network(model: torch.nn.Module, device: torch.device, *, cuda_graph: bool = False,
                     cache: CachePolicy | None = None) -> Callable[..., torch.Tensor]:
    """What the samplers call: ``model`` itself, or with ``cuda_graph`` a ``CUDAGraphRunner`` over it (CUDA and
    DiTFast only, never with a step cache, whose decisions are taken in Python); ValueError/TypeError otherwise."""
    if not cuda_graph:
        return model
    if device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
    if cache is not None:
        raise ValueError("cuda_graph and a step cache exclude each other: the cache decides each step in Python "
                         "(sample with one or the other)")
    return CUDAGraphRunner(model)


@torch.no_grad()
def generate(model: torch.nn.Module, labels: torch.Tensor, *, sampler: str = "ddpm", num_steps: int = 250,
             cfg_scale: float = 1.0, guide_channels: int | str = 3, interval: tuple[float, float] | None = None,
             seed: int = 0, first_index: int = 0, batch_size: int = 32, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None, clip_denoised: bool = False, progress: bool = True,
             cache: str | CachePolicy | None = None, cuda_graph: bool = False,
             cache_stats: dict[str, int] | None = None, transport: Transport | None = None,
             flow_options: dict[str, Any] | None = None) -> torch.Tensor:
    """Sample a DiT for every label: labels (N,) -> (N, C, H, W) float32 in the model's space (pixels or scaled
    latents), on the CPU. Sample k is global sample ``first_index + k`` for seeding (see the module docstring).

    ``dtype``: the weights' dtype to sample in (None: the model's own). A model in another dtype is cast once, as a
    copy (``cast_for_sampling``; cast in place first, e.g. ``DiTFast.for_inference(torch.bfloat16)``, to save the
    memory); no step autocasts. The sampler's arithmetic stays fp32. ``clip_denoised``
    clips each x_0 prediction to [-1, 1]: right for pixel-space models; latent models are not clipped (as the
    official sample_ddp.py). ``cache``: a step-caching policy or spec (``dit_fast.cache``; "none" or None: off,
    bit-identical), fresh for every batch. ``cuda_graph``: on CUDA, run a DiTFast through CUDA graphs captured
    once per batch shape and replayed every step (not with a cache, whose decisions are taken in Python).
    ``transport``: the objective of a flow model (then ``sampler`` is one of ``FLOW_SAMPLERS``, options in
    ``flow_options``; its SDE noise, as DDPM's, comes from each batch's seeded global RNG).
    """
    cfg = model.config
    labels = labels.to(torch.long)
    check_labels(labels, cfg.num_classes, what="class ids")
    if cfg_scale != 1.0 and cfg.class_dropout_prob == 0:
        raise ValueError("this model was trained without label dropout (no null class): guidance needs cfg_scale 1")
    device = torch.device(device)
    check_sampler(sampler, transport)
    cache = parse_cache(cache, network_calls(sampler, num_steps, flow_options))
    model = cast_for_sampling(model, dtype)
    dtype = weights_dtype(model)
    network = sampling_network(model, device, cuda_graph=cuda_graph, cache=cache)

    shape = (cfg.in_channels, *cfg.grid_input)
    out = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="sample", disable=not progress or len(starts) == 1):
        idx = range(first_index + start, first_index + min(start + batch_size, len(labels)))
        torch.manual_seed(mix_seed(seed, idx.start, 1))  # DDPM's per-step noise
        monitor = NonFiniteMonitor()
        z = sample_batch(network, initial_noise(seed, idx, shape, device), labels[start: start + len(idx)].to(device),
                         sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale, guide_channels=guide_channels,
                         interval=interval, null_class=cfg.num_classes, clip_denoised=clip_denoised,
                         progress=progress and len(starts) == 1, dtype=dtype, cache=cache, cache_stats=cache_stats,
                         monitor=monitor, transport=transport, flow_options=flow_options)
        bad = monitor.first_bad()
        if bad is not None or not bool(torch.isfinite(z).all()):
            at = (f"sampling step {bad[0]} of {num_steps} (timestep {bad[1]:g})" if transport is None else
                  f"network call {bad[0]} (flow time t = {bad[1]:.4g})") if bad is not None else ""
            where = (f"the model's output first did at {at}"
                     if bad is not None else "the model's outputs were finite, the sampler's arithmetic overflowed")
            raise ValueError(f"samples {idx.start}..{idx.stop - 1} hold NaN or inf: {where}; check the weights, the "
                             "dtype and the guidance scale")
        out.append(z.float().cpu())
    return torch.cat(out) if out else torch.empty((0, *shape))
def load_model(ckpt: str, *, model_name: str | None, num_classes: int | None, impl: str, device: torch.device,
               num_heads: int | None = None, dtype: torch.dtype = torch.float32
               ) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """Load any supported checkpoint (eval mode, no gradients) on ``device`` straight into ``dtype`` (a DiTFast
    through ``for_inference``); returns the model, a one-line description and the
    training objective the file stores ({} if none).

    ``--model``/``--num-classes`` only fill what the file does not store; where it stores them and they differ, the
    checkpoint loader's error says so. (The image size is read from the weights, and checked by the caller against
    ``--image-size`` once it knows whether the model works in pixels or in a VAE's latents.)
    """
    options: dict[str, Any] = {}
    if model_name is not None:
        options["model_name"] = model_name
    if num_classes is not None:
        options["num_classes"] = num_classes
    if num_heads is not None:
        options["num_heads"] = num_heads
    result = load_checkpoint(ckpt, model_cls=DiTFast if impl == "fast" else None, device=device, dtype=dtype,
                             **options)
    model = result.model.requires_grad_(False)
    if isinstance(model, DiTFast):
        model.for_inference(dtype)
    return model, result.summary().splitlines()[0] + f"; numerics {result.numerics}", result.objective
