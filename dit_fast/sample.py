"""Sample images from a trained DiT: a PNG grid and, with ``--npz``, an ADM-evaluator ``.npz``.

Loads our checkpoints (training ``.pt`` files, the dit-fast safetensors format), official ``.pt`` files (e.g.
``DiT-XL-2-256x256.pt``) and diffusers folders through ``dit_fast.checkpoints``. Samplers: the paper's DDPM
(``--sampler ddpm``, 250 respaced steps), DDIM and DPM-Solver++(2M), with classifier-free guidance on 3 channels
(official) or all eps channels and an optional guidance interval, through the model's ``forward_with_cfg``.
``--cache SPEC`` skips most of the network on most steps (``dit_fast.cache``: ``auto``, ``fora:N``,
``taylor:N:O``, ``adaptive:T``); on CUDA ``--cuda-graph`` replays one captured graph per step and ``--compile``
compiles the blocks. Latent models are decoded with a LOCAL VAE folder (``--vae``; see ``dit_fast.vae``).
ImageNet classes are given by id (0..999; e.g. 207 golden retriever, 360 otter, 387 lesser panda, 974 geyser,
88 macaw, 979 valley, 417 balloon, 279 arctic fox): no class-name table is shipped.

For FID-50K, shard across processes (rank r samples its contiguous slice; rank 0 merges the slices into one
``.npz`` with ``arr_0`` (N, H, W, 3) uint8 and ``labels`` (N,)):

    torchrun --nproc_per_node 8 -m dit_fast.cli sample --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema \\
        --num-samples 50000 --cfg-scale 1.5 --npz samples.npz

Seeding: sample i's initial noise comes from a generator seeded by (seed, i), so with a deterministic sampler
(ddim with eta 0, dpm++) a sample does not depend on the batch size or the number of processes; the DDPM sampler's
per-step noise comes from each batch's generator state (seed, first index of the batch). ARCHITECTURE.md at the
repository root follows one sampling step through the modules.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dit_fast.cache import CACHE_SPEC_HELP, CachePolicy, parse_cache, step_cache
from dit_fast.checkpoints import check_finite_weights, load_checkpoint
from dit_fast.data import mix_seed
from dit_fast.diffusion import (
    DIFFUSION_FORMS,
    FLOW_SAMPLERS,
    PATHS,
    PREDICTIONS,
    CFGModel,
    FlowSampler,
    Transport,
    create_diffusion,
    create_transport,
    flow_nfe,
)
from dit_fast.distributed import barrier, cleanup, setup_distributed
from dit_fast.files import atomic_write
from dit_fast.model import CUDAGraphRunner, DiTFast
from dit_fast.reference import check_labels
from dit_fast.vae import VAE
from dit_fast.validation import (
    UserError,
    check_free_space,
    check_output_file,
    float_arg,
    non_negative_int,
    positive_int,
)

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
                 guide_channels: int | str = 3, interval: tuple[int, int] | None = None, null_class: int,
                 clip_denoised: bool = False, diffusion_steps: int = 1000, progress: bool = False,
                 dtype: torch.dtype = torch.float32, cache: str | CachePolicy | None = None,
                 cache_stats: dict[str, int] | None = None, monitor: NonFiniteMonitor | None = None,
                 transport: Transport | None = None, flow_options: dict[str, Any] | None = None) -> torch.Tensor:
    """Run one sampler from ``noise`` (N, C, H, W) for ``labels`` (N,): -> samples (N, C, H, W) float32.

    ``model(x, t, y)`` is the network (a DiT, a ``CUDAGraphRunner`` or any callable). Guidance (``cfg_scale`` > 1)
    runs through ``dit_fast.diffusion.CFGModel``: one doubled pass per step, through the model's own
    ``forward_with_cfg`` when it has one. The network runs under autocast in ``dtype`` when that is not fp32; the
    sampler's arithmetic stays fp32. ``cache`` is a step-caching policy (``dit_fast.cache``; needs a DiT module);
    ``cache_stats``, when given, has its "full_steps" and "cached_steps" counts increased by this run's.
    ``monitor`` (a ``NonFiniteMonitor``) watches the guided network's outputs. A flow model (``transport``, the
    objective it was trained with) takes one of ``FLOW_SAMPLERS`` (``flow_options`` go to it, e.g. ``last_step``).
    """
    check_sampler(sampler, transport)
    guided = CFGModel(model, cfg_scale, null_class, guide_channels=guide_channels, interval=interval)
    device = noise.device
    autocast = dtype != torch.float32

    def network(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return guided(x, t, y).float()

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


def check_sampler(sampler: str, transport: Transport | None) -> None:
    """ValueError unless ``sampler`` belongs to the model's objective (flow when ``transport`` is given)."""
    family, other = (FLOW_SAMPLERS, SAMPLERS) if transport is not None else (SAMPLERS, FLOW_SAMPLERS)
    if sampler not in family:
        kind = "a flow" if transport is not None else "a DDPM"
        hint = f" ({sampler} is for {'DDPM' if transport is not None else 'flow'} models)" if sampler in other else ""
        raise ValueError(f"sampler {sampler!r} cannot sample {kind} model{hint}; choose one of {', '.join(family)}")


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
             cfg_scale: float = 1.0, guide_channels: int | str = 3, interval: tuple[int, int] | None = None,
             seed: int = 0, first_index: int = 0, batch_size: int = 32, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, clip_denoised: bool = False, progress: bool = True,
             cache: str | CachePolicy | None = None, cuda_graph: bool = False,
             cache_stats: dict[str, int] | None = None, transport: Transport | None = None,
             flow_options: dict[str, Any] | None = None) -> torch.Tensor:
    """Sample a DiT for every label: labels (N,) -> (N, C, H, W) float32 in the model's space (pixels or scaled
    latents), on the CPU. Sample k is global sample ``first_index + k`` for seeding (see the module docstring).

    ``dtype`` bf16 runs the network under autocast (the sampler's arithmetic stays fp32). ``clip_denoised``
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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 with the official rounding ``127.5 x + 128``."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int = 8, padding: int = 2,
              scale: int = 0) -> Path:
    """Write images (N, C, H, W) float in [-1, 1] or (N, H, W, C) uint8 as one PNG grid, ``nrow`` per row.

    ``scale`` > 1 enlarges each image by pixel repetition (default: so small images are at least 64 px). Written
    atomically.
    """
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 1|3), got {arr.shape}")
    n, h, w, c = arr.shape
    scale = scale or max(1, math.ceil(64 / max(h, w)))
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.zeros((padding + nrows * (h + padding), padding + ncol * (w + padding), c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[y0: y0 + h, x0: x0 + w] = arr[k]
    return atomic_write(path, lambda tmp: Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG"))


def write_npz(path: str | os.PathLike, shards: list[np.ndarray | str | os.PathLike], labels: np.ndarray) -> Path:
    """Write an ADM-evaluator ``.npz``: ``arr_0`` (N, H, W, 3) uint8 streamed from ``shards`` (arrays or ``.npy``
    paths, concatenated in order, never all in memory) and ``labels`` (N,). Atomic."""
    arrays = [np.load(s, mmap_mode="r") if not isinstance(s, np.ndarray) else s for s in shards]
    n = sum(len(a) for a in arrays)
    if n != len(labels):
        raise ValueError(f"{n} images but {len(labels)} labels")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, *arrays[0].shape[1:])}

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_2_0(out, header)
                for a in arrays:
                    for i in range(0, len(a), 1024):
                        out.write(np.ascontiguousarray(a[i: i + 1024], dtype=np.uint8).tobytes())
            with zf.open("labels.npy", "w") as out:
                np.lib.format.write_array(out, np.asarray(labels, dtype=np.int64))

    return atomic_write(path, write)


# ---------------------------------------------------------------------------------------------------- loading

def load_model(ckpt: str, *, model_name: str | None, image_size: int | None, num_classes: int | None,
               impl: str, device: torch.device, vae_factor: int = 8, num_heads: int | None = None
               ) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """Load any supported checkpoint (eval mode) on ``device``; returns the model, a one-line description and the
    training objective the file stores ({} if none).

    ``--model``/``--image-size``/``--num-classes`` only fill what the file does not store; where it stores them
    and they differ, the checkpoint loader's error says so.
    """
    options: dict[str, Any] = {}
    if model_name is not None:
        options["model_name"] = model_name
    if num_classes is not None:
        options["num_classes"] = num_classes
    if image_size is not None:
        options["input_size"] = image_size // vae_factor
    if num_heads is not None:
        options["num_heads"] = num_heads
    result = load_checkpoint(ckpt, model_cls=DiTFast if impl == "fast" else None, device=device, **options)
    return result.model, result.summary().splitlines()[0] + f"; numerics {result.numerics}", result.objective


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint: a dit-fast training .pt or safetensors folder/file, an official .pt, or a "
                             "diffusers DiT folder")
    parser.add_argument("--model", default=None, help="zoo name (e.g. DiT-XL/2), for files that store no config")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="pixel side, for files that store no config (latent side = image size / 8)")
    parser.add_argument("--num-classes", type=positive_int, default=None, help="for files that store no config")
    parser.add_argument("--num-heads", type=positive_int, default=None,
                        help="attention heads, for files that store no config and match no zoo model")
    parser.add_argument("--vae", default=None, help="LOCAL diffusers AutoencoderKL folder (needed for latent models)")
    parser.add_argument("--class-labels", type=non_negative_int, nargs="*", default=None,
                        help="class ids to sample, cycled over --num-samples (default: uniformly random classes)")
    parser.add_argument("--num-samples", type=positive_int, default=None,
                        help="images in total (default: the number of --class-labels, else 16)")
    parser.add_argument("--sampler", choices=SAMPLERS + FLOW_SAMPLERS, default=None,
                        help="DDPM models: ddpm (default), ddim, dpm++; flow models: sde (default), ode-heun, "
                             "ode-euler, ode-dopri5 (needs torchdiffeq)")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=250,
                        help="DDPM: steps; flow: time points as SiT counts them (network evaluations: ode-euler N-1, "
                             "ode-heun 2(N-1), sde N)")
    parser.add_argument("--cfg-scale", type=float_arg(1.0), default=4.0,
                        help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--guide-channels", default="3", choices=["3", "all"],
                        help="3: the official (channels 0..2 of 4); all: every eps channel")
    parser.add_argument("--guidance-interval", type=float_arg(0.0), nargs=2, default=None, metavar=("LO", "HI"),
                        help="apply guidance only at times LO..HI: DDPM timesteps (e.g. 0 700), flow times in [0, 1] "
                             "(t = 0 noise)")
    add_flow_arguments(parser)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward batch, per process")
    parser.add_argument("--out", default="sample.png", help="PNG grid path (of the first --grid-images samples)")
    parser.add_argument("--grid-images", type=positive_int, default=64)
    parser.add_argument("--npz", default=None, help="also write all samples as an ADM-evaluator .npz")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="network autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA only, DiTFast only: capture the network once per batch shape as a CUDA graph and "
                             "replay it every step")
    parser.add_argument("--cache", type=_cache_spec, default="none", metavar="SPEC",
                        help="training-free step caching (dit_fast.cache): " + CACHE_SPEC_HELP)
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--impl", choices=["fast", "reference"], default=None,
                        help="DiTFast or the plain reference model (default: fast)")
    parser.add_argument("--no-progress", action="store_true")


def add_flow_arguments(parser: argparse.ArgumentParser) -> None:
    """The objective and the flow samplers' options (SiT's names and defaults)."""
    group = parser.add_argument_group("objective and flow samplers (SiT)")
    group.add_argument("--objective", choices=["ddpm", "flow"], default=None,
                       help="the model's training objective (default: the one the checkpoint stores, else ddpm); "
                            "official SiT .pt files need --objective flow")
    group.add_argument("--path-type", choices=list(PATHS), default=None,
                       help="flow path, for files that store no objective (default Linear, as SiT-XL/2)")
    group.add_argument("--prediction", choices=list(PREDICTIONS), default=None,
                       help="what the flow model predicts, for files that store no objective (default velocity)")
    group.add_argument("--sample-eps", type=float_arg(0.0, 0.499), default=None,
                       help="flow: keep sampling times in [eps, 1 - eps] (default: the checkpoint's, else SiT's)")
    group.add_argument("--diffusion-form", choices=list(DIFFUSION_FORMS), default="sigma",
                       help="sde: the diffusion coefficient's form (SiT's command-line default: sigma)")
    group.add_argument("--diffusion-norm", type=float_arg(0.0), default=1.0, help="sde: its magnitude")
    group.add_argument("--last-step", choices=["Mean", "Tweedie", "Euler", "none"], default="Mean",
                       help="sde: the last step to t = 1")
    group.add_argument("--last-step-size", type=float_arg(0.0, 0.5), default=0.04, help="sde: its size")
    group.add_argument("--atol", type=float_arg(0.0, exclusive_min=True), default=1e-6, help="ode-dopri5 tolerance")
    group.add_argument("--rtol", type=float_arg(0.0, exclusive_min=True), default=1e-3, help="ode-dopri5 tolerance")


def flow_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of the chosen flow sampler."""
    if args.sampler == "sde":
        return {"diffusion_form": args.diffusion_form, "diffusion_norm": args.diffusion_norm,
                "last_step": None if args.last_step == "none" else args.last_step,
                "last_step_size": args.last_step_size}
    return {"atol": args.atol, "rtol": args.rtol} if args.sampler == "ode-dopri5" else {}


def resolve_objective(args: argparse.Namespace, stored: dict[str, Any]) -> Transport | None:
    """The transport of a flow model (None: DDPM) from the checkpoint's stored objective and the flags; sets
    ``args.sampler`` to the family's default. UserError when they disagree or when the file's name says SiT and
    nothing says which objective it has."""
    name = stored.get("name")
    if name is not None and args.objective is not None and args.objective != name:
        raise UserError(f"--objective {args.objective}: {args.ckpt} was trained with the {name} objective")
    objective = args.objective or name
    if objective is None and re.search(r"(^|[^a-z])sit([^a-z]|$)", Path(args.ckpt).name.lower()):
        raise UserError(f"{Path(args.ckpt).name} looks like a SiT (flow) checkpoint, which the file cannot say: pass "
                        "--objective flow (or --objective ddpm to sample it as a DiT)")
    if objective != "flow":
        for flag in ("path_type", "prediction", "sample_eps"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} is for flow models; this one is DDPM (pass "
                                "--objective flow for a flow model whose file does not say so)")
        args.sampler = args.sampler or "ddpm"
        return None
    if name == "flow":
        transport = Transport.from_dict(stored)
        for flag in ("path_type", "prediction"):
            given = getattr(args, flag)
            if given is not None and given != getattr(transport, flag):
                raise UserError(f"--{flag.replace('_', '-')} {given}: {args.ckpt} was trained with "
                                f"{getattr(transport, flag)}")
        if args.sample_eps is not None:
            transport = dataclasses.replace(transport, sample_eps=args.sample_eps)
    else:
        transport = create_transport(args.path_type or "Linear", args.prediction or "velocity",
                                     sample_eps=args.sample_eps)
    args.sampler = args.sampler or "sde"
    return transport


def _cache_spec(text: str) -> str:
    """argparse type of ``--cache``: the spec, checked at parse time ("auto" is resolved once the steps are known)."""
    try:
        parse_cache(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(args: argparse.Namespace) -> int:
    """Sample a trained DiT into a PNG grid (and an ADM .npz), sharded across torchrun processes."""
    check_output_file(args.out, "--out", example="sample.png")
    if args.npz:
        check_output_file(args.npz, "--npz", example="samples.npz")
    if args.guidance_interval and args.guidance_interval[0] > args.guidance_interval[1]:
        raise UserError(f"--guidance-interval {args.guidance_interval[0]} {args.guidance_interval[1]}: LO must be "
                        "<= HI")
    cache = parse_cache(args.cache, args.num_sampling_steps)
    if cache is not None and (args.compile or args.cuda_graph):
        raise UserError(f"--cache {args.cache} runs the blocks eagerly (it decides each step in Python): drop "
                        f"--{'compile' if args.compile else 'cuda-graph'}, or sample without a cache")
    if args.cuda_graph and (args.impl or "fast") != "fast":
        raise UserError("--cuda-graph needs the DiTFast implementation (--impl fast)")
    try:
        d = setup_distributed(args.device)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    if args.cuda_graph and d.device.type != "cuda":
        cleanup(d)
        raise UserError(f"--cuda-graph needs a CUDA device, sampling runs on {d.device}")
    if args.threads is not None and d.device.type == "cpu":
        torch.set_num_threads(args.threads)
    shard_path = None
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        impl = args.impl or "fast"
        model, description, stored_objective = load_model(args.ckpt, model_name=args.model, image_size=args.image_size,
                                                          num_classes=args.num_classes, impl=impl, device=d.device,
                                                          num_heads=args.num_heads)
        transport = resolve_objective(args, stored_objective)
        check_sampler(args.sampler, transport)
        cache = parse_cache(args.cache, network_calls(args.sampler, args.num_sampling_steps, flow_options(args)))
        check_finite_weights(model.state_dict(), args.ckpt)
        cfg = model.config
        vae = None
        if cfg.in_channels == 4:
            if args.vae is None:
                raise ValueError("this is a latent model (4 channels): pass --vae, a local AutoencoderKL folder "
                                 "(e.g. stabilityai/sd-vae-ft-ema downloaded with huggingface-cli)")
            vae = VAE(args.vae, device=d.device)
        if args.compile:
            model.compile()
        n = args.num_samples or (len(args.class_labels) if args.class_labels else 16)
        if args.class_labels:
            labels = torch.tensor(args.class_labels, dtype=torch.long).repeat(math.ceil(n / len(args.class_labels)))[:n]
        else:
            labels = torch.randint(0, cfg.num_classes, (n,), generator=torch.Generator().manual_seed(args.seed))
        check_labels(labels, cfg.num_classes, what="class ids")
        if args.npz:  # the .npz (and, across processes, the shards it is merged from) must fit before sampling
            h, w = (side * (vae.downsample if vae is not None else 1) for side in cfg.grid_input)
            check_free_space(Path(args.npz).parent, n * h * w * 3 * (2 if d.enabled else 1),
                             f"--npz {args.npz} ({n} images of {h}x{w})")
        per_rank = math.ceil(n / d.world_size)
        lo, hi = min(n, d.rank * per_rank), min(n, (d.rank + 1) * per_rank)
        if d.is_main:
            flow = f"; flow {transport.path_type}/{transport.prediction}" if transport is not None else ""
            print(f"{description}{flow}\nsampling {n} images ({args.sampler}-{args.num_sampling_steps}, cfg "
                  f"{args.cfg_scale}, guide {args.guide_channels}, cache {cache.spec if cache else 'none'}"
                  f"{', CUDA graphs' if args.cuda_graph else ''}) on {d.world_size} process(es)", flush=True)
        cache_stats: dict[str, int] = {}
        z = generate(model, labels[lo:hi], sampler=args.sampler, num_steps=args.num_sampling_steps,
                     cfg_scale=args.cfg_scale, guide_channels="all" if args.guide_channels == "all" else 3,
                     interval=tuple(args.guidance_interval) if args.guidance_interval else None, seed=args.seed,
                     first_index=lo, batch_size=args.batch_size, device=d.device,
                     dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, clip_denoised=vae is None,
                     progress=d.is_main and not args.no_progress, cache=cache, cuda_graph=args.cuda_graph,
                     cache_stats=cache_stats, transport=transport, flow_options=flow_options(args))
        if cache is not None and d.is_main:
            print(f"cache {cache.spec}: {cache_stats.get('full_steps', 0)} full network evaluations, "
                  f"{cache_stats.get('cached_steps', 0)} cached (this process)", flush=True)
        if vae is not None:
            z = torch.cat([vae.decode(z[i: i + args.batch_size]).cpu() for i in range(0, len(z), args.batch_size)])
        images = to_uint8(z)  # (n_rank, H, W, C)
        if images.shape[-1] == 1:
            images = images.repeat(3, axis=-1)  # the ADM evaluator expects RGB
        if d.enabled:
            out_dir = Path(args.npz or args.out).resolve().parent
            out_dir.mkdir(parents=True, exist_ok=True)
            shard_path = out_dir / f".sample-shard-{d.rank:05d}-{os.getppid()}.npy"
            np.save(shard_path, images)
            barrier(d)
        if d.is_main:
            shards: list[Any] = [images]
            if d.enabled:
                shards = [out_dir / f".sample-shard-{r:05d}-{os.getppid()}.npy" for r in range(d.world_size)]
            first = np.concatenate([np.load(s, mmap_mode="r")[: args.grid_images] if not isinstance(s, np.ndarray)
                                    else s[: args.grid_images] for s in shards])[: args.grid_images]
            save_grid(first, args.out, nrow=max(1, int(math.sqrt(len(first)))))
            print(f"wrote {args.out} ({len(first)} images)")
            if args.npz:
                write_npz(args.npz, shards, labels.numpy())
                print(f"wrote {args.npz} (arr_0 ({n}, {images.shape[1]}, {images.shape[2]}, 3) uint8, labels)")
        barrier(d)
    finally:
        if shard_path is not None:
            with contextlib.suppress(OSError):
                shard_path.unlink()
        cleanup(d)
    return 0
