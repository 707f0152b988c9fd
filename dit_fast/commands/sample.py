"""``dit-fast sample``: sample a trained DiT into a PNG grid and, with ``--npz``, an ADM-evaluator ``.npz``.

Loads any checkpoint ``dit_fast.checkpoints`` reads (dit-fast training ``.pt`` or safetensors, official ``.pt``
such as ``DiT-XL-2-256x256.pt``, diffusers folders). Latent models are decoded with a LOCAL VAE folder (``--vae``).
ImageNet classes are given by id (0..999; e.g. 207 golden retriever, 360 otter, 387 lesser panda, 974 geyser,
88 macaw, 979 valley, 417 balloon, 279 arctic fox): no class-name table is shipped. For FID-50K, shard across
processes (rank r samples its contiguous slice; rank 0 merges the slices into one ``.npz`` with ``arr_0``
(N, H, W, 3) uint8 and ``labels`` (N,)):

    torchrun --nproc_per_node 8 -m dit_fast.cli sample --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema \\
        --num-samples 50000 --cfg-scale 1.5 --npz samples.npz

The sampling itself (seeding, samplers, guidance, caching, CUDA graphs) is ``dit_fast.sampling.generate``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_fast.cache import CACHE_SPEC_HELP, CachePolicy, parse_cache
from dit_fast.checkpoints import check_finite_weights
from dit_fast.commands.arguments import argument_type, float_arg, int_arg, non_negative_int, positive_int
from dit_fast.diffusion import DIFFUSION_FORMS, FLOW_SAMPLERS, PATHS, PREDICTIONS, Transport, create_transport
from dit_fast.kernels.registry import check_environment as check_kernels_environment
from dit_fast.models.attention import check_environment as check_attention_environment
from dit_fast.models.config import DiTConfig
from dit_fast.models.fp8 import enable_fp8, fp8_unavailable_reason
from dit_fast.models.vae import VAE, import_autoencoder
from dit_fast.reference import check_labels
from dit_fast.sampling.generate import (
    DIFFUSION_STEPS,
    SAMPLERS,
    check_sampler,
    generate,
    load_model,
    model_timesteps,
    network_calls,
)
from dit_fast.sampling.outputs import save_grid, to_uint8, write_npz
from dit_fast.utils.distributed import Dist, barrier, cleanup, setup_distributed
from dit_fast.utils.environment import check_memory, device_name
from dit_fast.utils.files import sweep_stale_temps
from dit_fast.utils.guard import Output, check_outputs, image_format
from dit_fast.utils.hardware import inference_dtype, native_bf16
from dit_fast.utils.validation import SEED_MAX, UserError, check_free_space, check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint: a dit-fast training .pt or safetensors folder/file, an official .pt, or a "
                             "diffusers DiT folder")
    parser.add_argument("--model", default=None, help="zoo name (e.g. DiT-XL/2), for files that store no config")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="pixel side the model makes: checked against the checkpoint (latent side x the VAE's 8)")
    parser.add_argument("--num-classes", type=positive_int, default=None, help="for files that store no config")
    parser.add_argument("--num-heads", type=positive_int, default=None,
                        help="attention heads, for files that store no config and match no zoo model")
    parser.add_argument("--vae", default=None, help="LOCAL diffusers AutoencoderKL folder (needed for latent models)")
    parser.add_argument("--class-labels", type=non_negative_int, nargs="+", default=None,
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
    parser.add_argument("--seed", type=int_arg(0, SEED_MAX), default=0, help=f"0..{SEED_MAX}")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward batch, per process")
    parser.add_argument("--out", default="sample.png",
                        help="grid image of the first --grid-images samples; .png, .jpg or .webp (the suffix picks "
                             "the format)")
    parser.add_argument("--grid-images", type=positive_int, default=64)
    parser.add_argument("--npz", default=None, help="also write all samples as an ADM-evaluator .npz")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files at --out / --npz even when they are not images / sample .npz "
                             "files this command wrote")
    parser.add_argument("--device", type=argument_type(device_name), default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="the DiT's weights' dtype, cast once at load, and the VAE's where the device has native "
                             "bf16 (auto: bf16 where the device has native bf16 GEMMs, CUDA sm_80+ or an "
                             "AVX512-BF16/AMX CPU, else fp32; fp32 reproduces published numbers)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--fp8", action="store_true",
                        help="FP8 (torchao float8 rowwise) for the blocks' linears; Ada/Hopper GPUs, needs torchao")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA only, DiTFast only: capture the network once per batch shape as a CUDA graph and "
                             "replay it every step")
    parser.add_argument("--cache", type=_cache_spec, default="none", metavar="SPEC",
                        help="training-free step caching (dit_fast.cache): " + CACHE_SPEC_HELP)
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--impl", choices=["fast", "reference"], default=None,
                        help="DiTFast or the plain reference model (default: fast)")
    parser.add_argument("--no-progress", action="store_true")
    add_flow_arguments(parser)


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
        transport = None
    elif name == "flow":
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
    args.sampler = args.sampler or ("ddpm" if transport is None else "sde")
    try:
        check_sampler(args.sampler, transport)
    except ValueError as e:
        raise UserError(str(e)) from None
    return transport


def _cache_spec(text: str) -> str:
    """argparse type of ``--cache``: the spec, checked at parse time ("auto" is resolved once the steps are known)."""
    try:
        parse_cache(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def check_options(args: argparse.Namespace) -> CachePolicy | None:
    """Reject option combinations that cannot work, before any process starts; returns the cache policy."""
    check_attention_environment()
    check_kernels_environment()
    check_outputs({"--out": Output(args.out, "image"), "--npz": Output(args.npz, "npz") if args.npz else None},
                  {"--ckpt": args.ckpt, "--vae": args.vae}, overwrite=args.overwrite)
    image_format(args.out)
    check_output_file(args.out, "--out", example="sample.png")
    if args.npz:
        check_output_file(args.npz, "--npz", example="samples.npz")
    if args.guidance_interval:
        lo, hi = args.guidance_interval
        if lo > hi:
            raise UserError(f"--guidance-interval {lo:g} {hi:g}: LO must be <= HI")
        if hi >= DIFFUSION_STEPS:
            raise UserError(f"--guidance-interval {lo:g} {hi:g}: the model's diffusion has timesteps "
                            f"0..{DIFFUSION_STEPS - 1}; outside them guidance would never apply")
    cache = parse_cache(args.cache, args.num_sampling_steps)
    if cache is not None and (args.compile or args.cuda_graph):
        raise UserError(f"--cache {args.cache} runs the blocks eagerly (it decides each step in Python): drop "
                        f"--{'compile' if args.compile else 'cuda-graph'}, or sample without a cache")
    if args.cuda_graph and (args.impl or "fast") != "fast":
        raise UserError("--cuda-graph needs the DiTFast implementation (--impl fast)")
    return cache


def start_processes(args: argparse.Namespace) -> Dist:
    """Join the torchrun process group (or run alone) on ``--device``."""
    try:
        d = setup_distributed(args.device)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    if args.cuda_graph and d.device.type != "cuda":
        cleanup(d)
        raise UserError(f"--cuda-graph needs a CUDA device, sampling runs on {d.device}")
    if args.fp8 and (reason := fp8_unavailable_reason(d.device)) is not None:
        cleanup(d)
        raise UserError(reason)
    if args.threads is not None and d.device.type == "cpu":
        torch.set_num_threads(args.threads)
    return d




def load_networks(args: argparse.Namespace, d: Dist) -> tuple[torch.nn.Module, VAE | None, str, Transport | None]:
    """The DiT (finite weights checked, compiled on request), the VAE of a latent model, the model's description
    and, for a flow model, its transport (``resolve_objective``, which also sets ``args.sampler``).

    With ``--vae``, diffusers is imported on a second thread while the DiT's weights are read and cast (C++ work that
    releases the GIL): that import is most of a VAE's load. Only the import: diffusers builds models under global
    patches (meta-device initialisation) that must not meet another thread's model construction."""
    dtype, why = inference_dtype(d.device, args.dtype)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="import-diffusers") as pool:
        if args.vae:  # an ImportError stays in the future: the VAE's own check names the install
            pool.submit(import_autoencoder)
        model, description, stored = load_model(args.ckpt, model_name=args.model, num_classes=args.num_classes,
                                                impl=args.impl or "fast", device=d.device, num_heads=args.num_heads,
                                                dtype=dtype)
    vae = None
    if model.config.in_channels == 4:
        if args.vae is None:
            raise UserError("this is a latent model (4 channels): pass --vae, a local AutoencoderKL folder "
                            "(e.g. stabilityai/sd-vae-ft-ema downloaded with huggingface-cli)")
        vae = VAE(args.vae, device=d.device, dtype=vae_dtype(dtype, d.device))
    description += f"\ndtype {str(dtype).removeprefix('torch.')} ({why})"
    transport = resolve_objective(args, stored)
    if transport is not None:
        description += f"; flow objective, {transport.path_type} path, {transport.prediction} prediction"
    check_finite_weights(model.state_dict(), args.ckpt)
    side = model.config.grid_input[0] * (vae.downsample if vae is not None else 1)
    if args.image_size is not None and args.image_size != side:
        space = "latents decoded by the VAE" if vae is not None else "pixel space"
        raise UserError(f"--image-size {args.image_size} does not match the checkpoint, which makes {side}x{side} "
                        f"images ({space}); drop --image-size or pass {side}")
    if args.fp8:
        enable_fp8(model)
    if args.compile:
        model.compile()
    return model, vae, description, transport


def check_interval_meets_steps(args: argparse.Namespace) -> None:
    """UserError when a guided DDPM-family run's ``--guidance-interval`` holds none of the timesteps its sampler
    visits (between two of DDIM-50's steps, say): the run would silently sample unguided."""
    if not args.guidance_interval or args.cfg_scale == 1:
        return
    lo, hi = args.guidance_interval
    steps = model_timesteps(args.sampler, args.num_sampling_steps)
    if not any(lo <= t <= hi for t in steps):
        below, above = max((t for t in steps if t < lo), default=None), min((t for t in steps if t > hi), default=None)
        near = " and ".join(str(t) for t in (below, above) if t is not None)
        raise UserError(f"--guidance-interval {lo:g} {hi:g} holds none of the {len(steps)} timesteps "
                        f"{args.sampler}-{args.num_sampling_steps} visits (the nearest: {near}); guidance would "
                        "never apply: widen the interval or change --num-sampling-steps")


def vae_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE decodes in the sampling dtype where the device computes bf16 natively; elsewhere in fp32 (its
    convolutions would take PyTorch's slow bf16 loops; the DiT then widens each GEMM to fp32 instead)."""
    return dtype if dtype == torch.float32 or native_bf16(device)[0] else torch.float32


def preflight(args: argparse.Namespace, config: DiTConfig, vae: VAE | None, d: Dist) -> None:
    """Before sampling: this process's samples fit in memory, the grid (uncompressed, an upper bound) and the
    ``.npz`` (with, across processes, the shards it is merged from) fit on their disks."""
    n = args.num_samples or (len(args.class_labels) if args.class_labels else 16)
    per_rank = math.ceil(n / d.world_size)
    h, w = (side * (vae.downsample if vae is not None else 1) for side in config.grid_input)
    latent = config.in_channels * config.grid_input[0] * config.grid_input[1] * 4
    check_memory(per_rank * (latent + 2 * h * w * 3) + n * 8, f"--num-samples {n}: the samples")
    scale = max(1, math.ceil(64 / max(h, w)))
    check_free_space(Path(args.out).parent, min(n, args.grid_images) * h * w * 3 * scale * scale,
                     f"--out {args.out} (a grid of {min(n, args.grid_images)} images of {h}x{w})")
    if args.npz:
        check_free_space(Path(args.npz).parent, n * h * w * 3 * (2 if d.enabled else 1),
                         f"--npz {args.npz} ({n} images of {h}x{w})")


def class_labels(args: argparse.Namespace, num_classes: int) -> torch.Tensor:
    """The (N,) class ids: ``--class-labels`` cycled over ``--num-samples``, else uniformly random (seeded)."""
    n = args.num_samples or (len(args.class_labels) if args.class_labels else 16)
    if args.class_labels:
        labels = torch.tensor(args.class_labels, dtype=torch.long).repeat(math.ceil(n / len(args.class_labels)))[:n]
    else:
        labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(args.seed))
    check_labels(labels, num_classes, what="class ids")
    return labels


def sample_images(args: argparse.Namespace, model: torch.nn.Module, vae: VAE | None, labels: torch.Tensor,
                  cache: CachePolicy | None, d: Dist, transport: Transport | None = None) -> np.ndarray:
    """This process's slice of the samples as (n_rank, H, W, 3) uint8 (decoded by the VAE for latent models)."""
    per_rank = math.ceil(len(labels) / d.world_size)
    lo, hi = min(len(labels), d.rank * per_rank), min(len(labels), (d.rank + 1) * per_rank)
    cache_stats: dict[str, int] = {}
    z = generate(model, labels[lo:hi], sampler=args.sampler, num_steps=args.num_sampling_steps,
                 cfg_scale=args.cfg_scale, guide_channels="all" if args.guide_channels == "all" else 3,
                 interval=tuple(args.guidance_interval) if args.guidance_interval else None, seed=args.seed,
                 first_index=lo, batch_size=args.batch_size, device=d.device,
                 clip_denoised=vae is None,
                 progress=d.is_main and not args.no_progress, cache=cache, cuda_graph=args.cuda_graph,
                 cache_stats=cache_stats, transport=transport, flow_options=flow_options(args))
    if cache is not None and d.is_main:
        print(f"cache {cache.spec}: {cache_stats.get('full_steps', 0)} full network evaluations, "
              f"{cache_stats.get('cached_steps', 0)} cached (this process)", flush=True)
    if vae is not None:
        z = torch.cat([vae.decode(z[i: i + args.batch_size]).cpu() for i in range(0, len(z), args.batch_size)])
    images = to_uint8(z)  # (n_rank, H, W, C)
    return images.repeat(3, axis=-1) if images.shape[-1] == 1 else images  # the ADM evaluator expects RGB


def _shard_path(args: argparse.Namespace, rank: int) -> Path:
    return Path(args.npz or args.out).resolve().parent / f".sample-shard-{rank:05d}-{os.getppid()}.npy"


def write_outputs(args: argparse.Namespace, images: np.ndarray, labels: torch.Tensor, d: Dist) -> None:
    """Rank 0 writes the PNG grid and the ``.npz`` of every process's samples (merged from per-rank shards)."""
    shards: list[Any] = [images]
    if d.enabled:
        shards = [_shard_path(args, r) for r in range(d.world_size)]
    first = np.concatenate([np.load(s, mmap_mode="r")[: args.grid_images] if not isinstance(s, np.ndarray)
                            else s[: args.grid_images] for s in shards])[: args.grid_images]
    save_grid(first, args.out, nrow=max(1, int(math.sqrt(len(first)))))
    print(f"wrote {args.out} ({len(first)} images)")
    if args.npz:
        write_npz(args.npz, shards, labels.numpy())
        print(f"wrote {args.npz} (arr_0 ({len(labels)}, {images.shape[1]}, {images.shape[2]}, 3) uint8, labels)")


def main(args: argparse.Namespace) -> int:
    """Sample a trained DiT into a grid image (and an ADM .npz), sharded across torchrun processes."""
    cache = check_options(args)
    d = start_processes(args)
    if d.is_main:  # the temporaries of a killed run writing these outputs
        for path in (args.out, args.npz):
            if path:
                sweep_stale_temps(path)
    shard_path, finished = None, False
    model = vae = None
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        model, vae, description, transport = load_networks(args, d)
        if transport is None:
            check_interval_meets_steps(args)
        preflight(args, model.config, vae, d)
        cache = parse_cache(args.cache, network_calls(args.sampler, args.num_sampling_steps, flow_options(args)))
        labels = class_labels(args, model.config.num_classes)
        n = len(labels)
        if d.is_main:
            print(f"{description}\nsampling {n} images ({args.sampler}-{args.num_sampling_steps}, cfg "
                  f"{args.cfg_scale}, guide {args.guide_channels}, cache {cache.spec if cache else 'none'}"
                  f"{', CUDA graphs' if args.cuda_graph else ''}) on {d.world_size} process(es)", flush=True)
        images = sample_images(args, model, vae, labels, cache, d, transport)
        if d.enabled:
            shard_path = _shard_path(args, d.rank)
            shard_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(shard_path, images)
            barrier(d)
        if d.is_main:
            write_outputs(args, images, labels, d)
        barrier(d)  # rank 0 has read every shard: now each process may delete its own
        finished = True
    finally:
        if shard_path is not None:
            with contextlib.suppress(OSError):
                shard_path.unlink()
        model = vae = None
        cleanup(d, finished=finished)
    return 0
