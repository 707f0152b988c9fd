"""Train a DiT: one process (CPU or GPU), DDP across ``torchrun`` processes, or FSDP.

With no arguments, ``dit-fast train`` trains a small DiT on the built-in handwritten digits (scikit-learn's, pixel
space, no download) in a few minutes on a laptop CPU, then samples a grid and scores it (``dit_fast.metrics``).
With ``--data-path`` it trains on an image folder (ImageNet layout; encoded online by ``--vae``) or on a latent
folder from ``dit-fast extract-latents``, with the official recipe's defaults (DiT-XL/2, AdamW lr 1e-4, no weight
decay, global batch 256, EMA 0.9999):

    torchrun --nproc_per_node 8 -m dit_fast.cli train --data-path latents/ --model DiT-XL/2

Determinism: the data order and flips are a function of (global seed, epoch), and every per-sample random draw
(timestep, noise, label dropout, latent sample) is drawn for the whole global batch from a generator seeded by
(global seed, step) and sliced by rank, so a run's result does not depend on how the global batch is split over
processes, and a resumed run continues exactly (bitwise, on CPU) where a killed one left off. Label dropout for
classifier-free guidance is therefore applied here (labels set to the null class ``num_classes``), and the model
runs with ``train=False``: the label dropout is the only thing that mode switches.

Checkpoints (``results/NNN-<model>/checkpoints/<step>.pt``) are written atomically (temp file, fsync,
``os.replace``), the last ``--keep-last`` kept, and hold the model, EMA, optimizer, step, data position, RNG states
and config; they are a superset of the official train.py checkpoints ("model", "ema", "opt", "args").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dit_fast.config import CONFIGS, DiTConfig, get_config, gflops
from dit_fast.data import (
    DigitsDataset,
    ImageFolderDataset,
    LatentDataset,
    StepBatchSampler,
    build_dataset,
    collate,
    mix_seed,
    sample_latents,
)

CHECKPOINT_FORMAT = "dit-fast-train-v1"
CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")

# The built-in default: a small DiT on the 8x8 digits, and a recipe that trains it well in minutes on a CPU.
# Small and many steps beats wide and few here: in 180 s of CPU time width 64 made 5,338 steps where width 128 made
# 851, with far better samples (benchmarks/results/digits_default.md). One CPU thread: these matmuls are too small
# to split, and extra threads collapse on a shared CPU.
DIGITS_MODEL = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=2,
                         num_classes=10)
DIGITS_RECIPE = {"global_batch_size": 32, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999, "ema_warmup": True,
                 "max_steps": 8000, "epochs": 1000, "log_every": 500, "ckpt_every": 2000, "image_size": 8,
                 "threads": 1}
OFFICIAL_RECIPE = {"global_batch_size": 256, "lr": 1e-4, "warmup_steps": 0, "ema_decay": 0.9999, "ema_warmup": False,
                   "max_steps": None, "epochs": 1400, "log_every": 100, "ckpt_every": 50_000, "image_size": 256,
                   "threads": None}

# Dense peak FLOP/s (bf16, tf32) per GPU, for MFU.
PEAK_FLOPS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12),
              "L40S": (362e12, 183e12), "A10": (125e12, 62.5e12), "RTX 4090": (165e12, 82.6e12)}


# ---------------------------------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    """This process's place: rank, world size, local rank, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None) -> Dist:
    """Join the ``torchrun`` process group if launched by torchrun (nccl on GPU, gloo on CPU), else one process."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, dev)


def all_reduce_mean(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world_size


def broadcast_object(obj: Any, d: Dist) -> Any:
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------- seeding

def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of training step ``step``'s per-sample draws, identical on every rank."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, 1 << 20, step))


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and python RNG states, as tensors/lists (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------- model

def build_model(config: DiTConfig, impl: str = "reference", attention: str = "auto", kernels: str = "auto"
                ) -> nn.Module:
    """A freshly initialised DiT for ``config``: "reference" (plain PyTorch) or "fast" (DiTFast, when installed)."""
    if impl == "reference":
        from dit_fast.reference import DiT

        return DiT.from_config(config)
    if impl == "fast":
        from dit_fast.model import DiTFast

        d = config.to_dict()
        numerics = d.pop("numerics")
        return DiTFast(**d, numerics=numerics, kernels=kernels, attention=attention)
    raise ValueError(f"unknown --impl {impl!r}; choose 'fast' or 'reference'")


def apply_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass (state-dict keys unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    blocks = set(model.blocks)
    apply_activation_checkpointing(model, check_fn=lambda m: m in blocks)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over the parameters (the official update)."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]  # same registration order (wrappers keep it)
    if len(params) != len(ema_params):
        raise ValueError(f"EMA has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1.0 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay after ``step`` updates: ``decay``, or with warm-up ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of this GPU for ``dtype`` (bf16 or tf32/fp32), or None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if dtype == torch.bfloat16 else tf32
    return None


# ---------------------------------------------------------------------------------------------------- checkpoints

def state_dicts(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded, CPU) state dicts of model, EMA and optimizer, whatever the wrapping (DDP, FSDP, compile,
    activation checkpointing). A collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts), get_model_state_dict(ema, options=opts),
            get_optimizer_state_dict(model, opt, options=opts))


def load_state_dicts(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, ckpt: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    set_model_state_dict(ema, ckpt["ema"], options=opts)
    set_optimizer_state_dict(model, opt, ckpt["opt"], options=opts)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: the file is whole or absent."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not supported on every platform)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in a folder (``0001000.pt``...), oldest first; temp files are ignored."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_train_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint written by this module; ValueError if unreadable, truncated or of another kind."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails in many ways (zip, unpickler, storage errors)
        raise ValueError(f"checkpoint {str(path)!r} is unreadable (corrupt or truncated): {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a dit-fast training checkpoint (no optimizer/RNG/data state to "
                         "resume from); to fine-tune from weights, load them with dit_fast.checkpoints")
    return ckpt


def resolve_resume(resume: str, results_dir: str, log: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint for ``--resume`` and its path, falling back past unreadable ones (logged).

    ``resume`` is "auto" (the newest experiment folder under ``results_dir`` that has checkpoints; None when there
    is none), an experiment folder, its checkpoints folder, or a checkpoint file (older ones beside it are the
    fallbacks).
    """
    p = Path(resume)
    if resume == "auto":
        candidates: list[Path] = []
        for exp in sorted(glob.glob(os.path.join(results_dir, "[0-9][0-9][0-9]-*")), reverse=True):
            candidates = list_checkpoints(Path(exp) / "checkpoints")
            if candidates:
                break
        if not candidates:
            return None
    elif p.is_file():
        older = [c for c in list_checkpoints(p.parent) if _ckpt_step(c) < _ckpt_step(p)]
        candidates = [*older, p]
    elif p.is_dir():
        candidates = list_checkpoints(p / "checkpoints" if (p / "checkpoints").is_dir() else p)
        if not candidates:
            raise FileNotFoundError(f"--resume {resume!r}: no checkpoints (NNNNNNN.pt) found there")
    else:
        raise FileNotFoundError(f"--resume {resume!r} does not exist")
    problems = []
    for path in reversed(candidates):
        try:
            return load_train_checkpoint(path), path
        except ValueError as e:
            problems.append(str(e))
            log(f"WARNING: {e}; falling back to the previous checkpoint")
    raise ValueError("no readable checkpoint to resume from:\n  " + "\n  ".join(problems))


def _ckpt_step(path: Path) -> int:
    m = CHECKPOINT_NAME.match(path.name)
    return int(m.group(1)) if m else 1 << 62


# ---------------------------------------------------------------------------------------------------- recipe

def resolve_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Fill every unset (None) flag from the digits recipe (no --data-path) or the official one."""
    recipe = DIGITS_RECIPE if args.data_path is None else OFFICIAL_RECIPE
    out = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in recipe.items()}
    if args.epochs is not None and args.max_steps is None:
        out["max_steps"] = None  # an explicit --epochs is the budget
    return out


def resolve_config(args: argparse.Namespace, in_channels: int, input_size: int | tuple[int, int],
                   data_classes: int) -> DiTConfig:
    """The model config: --model (default DiT-XL/2, or the small digits DiT) fitted to the data's channels, model
    input size (pixels or latents) and classes (--num-classes, at least the data's)."""
    num_classes = args.num_classes if args.num_classes is not None else data_classes
    if num_classes < data_classes:
        raise ValueError(f"--num-classes {num_classes} is smaller than the {data_classes} classes of the data")
    if isinstance(input_size, tuple) and input_size[0] == input_size[1]:
        input_size = input_size[0]
    overrides = {name: getattr(args, name) for name in ("hidden_size", "depth", "num_heads", "patch_size")
                 if getattr(args, name) is not None}
    if args.model is None and args.data_path is None:
        base = DIGITS_MODEL
    else:
        base = get_config(args.model or "DiT-XL/2")
    return base.replace(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **overrides)


def new_experiment_dir(results_dir: str, model_name: str) -> Path:
    os.makedirs(results_dir, exist_ok=True)
    index = len(glob.glob(os.path.join(results_dir, "*")))
    while True:
        path = Path(results_dir) / f"{index:03d}-{model_name.replace('/', '-')}"
        try:
            (path / "checkpoints").mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            index += 1


# ---------------------------------------------------------------------------------------------------- logging

class RunLog:
    """Rank 0's log: lines to the terminal (above the progress bar) and log.txt; metrics rows to log.csv."""

    FIELDS = ["step", "epoch", "loss", "mse", "vb", "lr", "steps_per_sec", "images_per_sec", "mfu", "elapsed_s"]

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.bar: tqdm | None = None

    def __call__(self, msg: str) -> None:
        if self.folder is None:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        if self.bar is not None:
            tqdm.write(line)
        else:
            print(line, flush=True)
        with open(self.folder / "log.txt", "a") as f:
            f.write(line + "\n")

    def row(self, values: dict[str, Any]) -> None:
        if self.folder is None:
            return
        path = self.folder / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: values.get(k, "") for k in self.FIELDS})


# ---------------------------------------------------------------------------------------------------- training

class Trainer:
    """Holds the run's state; ``run()`` trains from ``self.step`` to ``self.total_steps``."""

    def __init__(self, args: argparse.Namespace, d: Dist):
        self.args, self.d = args, d
        self.recipe = resolve_recipe(args)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or
                                                                   ("bf16" if d.device.type == "cuda" else "fp32")]
        self.dataset = build_dataset(args.data_path, self.recipe["image_size"])
        self.vae = None
        if isinstance(self.dataset, LatentDataset):
            in_channels, input_size = self.dataset.in_channels, self.dataset.latent_size
        elif isinstance(self.dataset, ImageFolderDataset):
            if args.vae is None:
                raise ValueError("training on an image folder needs --vae (a local AutoencoderKL folder, e.g. "
                                 "stabilityai/sd-vae-ft-ema downloaded), or pre-extract latents with "
                                 "`dit-fast extract-latents`")
            from dit_fast.vae import VAE

            self.vae = VAE(args.vae, device=d.device)
            if self.recipe["image_size"] % self.vae.downsample:
                raise ValueError(f"--image-size {self.recipe['image_size']} is not a multiple of the VAE's "
                                 f"downsampling factor {self.vae.downsample}")
            in_channels, input_size = self.vae.latent_channels, self.recipe["image_size"] // self.vae.downsample
        else:
            in_channels, input_size = self.dataset.in_channels, self.recipe["image_size"]
        self.config = resolve_config(args, in_channels, input_size, self.dataset.num_classes)
        self.global_batch = int(self.recipe["global_batch_size"])
        if self.global_batch % d.world_size:
            raise ValueError(f"--global-batch-size {self.global_batch} is not divisible by the {d.world_size} "
                             "processes")
        self.local_batch = self.global_batch // d.world_size
        steps_per_epoch = len(self.dataset) // self.global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.dataset)} samples, fewer than one global batch of "
                             f"{self.global_batch}; lower --global-batch-size")
        epoch_steps = int(self.recipe["epochs"]) * steps_per_epoch
        max_steps = self.recipe["max_steps"]
        self.total_steps = epoch_steps if max_steps is None else min(int(max_steps), epoch_steps)

        from dit_fast.diffusion import create_diffusion

        self.diffusion = create_diffusion(timestep_respacing="", diffusion_steps=args.diffusion_steps)
        self.step, self.epoch, self.index = 0, 0, 0
        self.resumed: dict[str, Any] | None = None
        self._setup_folder()
        self._build()

    # -- setup

    def _setup_folder(self) -> None:
        args, d = self.args, self.d
        self.log = RunLog(None)
        found = None
        if args.resume is not None and d.is_main:
            found = resolve_resume(args.resume, args.results_dir, print)
            if found is None:
                print(f"--resume auto: no checkpoint under {args.results_dir!r}; starting a new run")
            else:
                self.resumed = found[0]
        found = broadcast_object(None if found is None else str(found[1]), d)
        if found is not None:
            ckpt_path = Path(found)
            self.exp_dir = ckpt_path.parent.parent
            if self.resumed is None:  # the other ranks read the checkpoint rank 0 chose
                self.resumed = load_train_checkpoint(ckpt_path)
            saved = DiTConfig.from_dict(self.resumed["config"])
            if saved != self.config:
                diff = {f: (getattr(saved, f), getattr(self.config, f)) for f in saved.to_dict()
                        if getattr(saved, f) != getattr(self.config, f)}
                raise ValueError(f"checkpoint {found} is of another model config; differing fields "
                                 f"(checkpoint, this run): {diff}")
        else:
            name = args.model or ("DiT-digits" if args.data_path is None else "DiT-XL/2")
            path = new_experiment_dir(args.results_dir, name) if d.is_main else None
            self.exp_dir = Path(broadcast_object(None if path is None else str(path), d))
        self.ckpt_dir = self.exp_dir / "checkpoints"
        self.log = RunLog(self.exp_dir if d.is_main else None)
        if found is not None:
            self.log(f"resuming from {found} (step {self.resumed['step']})")
            if d.is_main:
                for stale in self.ckpt_dir.glob(".*.tmp-*"):  # left by a run killed while writing
                    stale.unlink(missing_ok=True)

    def _build(self) -> None:
        args, d = self.args, self.d
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        impl = args.impl or "fast"
        torch.manual_seed(args.global_seed)  # identical initial weights on every rank and for every world size
        model = build_model(self.config, impl, args.attention, args.kernels).to(d.device)
        ema = build_model(self.config, impl, args.attention, args.kernels).to(d.device)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False).eval()
        model.eval()  # label dropout is applied by the trainer, per global sample (see the module docstring)
        seed_everything(args.global_seed * d.world_size + d.rank)  # per-rank seed, as the official script
        self.params = sum(p.numel() for p in model.parameters())
        if args.grad_checkpointing:
            apply_grad_checkpointing(model)
        if args.fsdp:
            if not d.enabled:
                raise ValueError("--fsdp needs several processes (launch with torchrun)")
            from torch.distributed.fsdp import fully_shard

            for m in (model, ema):
                for block in m.blocks:
                    fully_shard(block)
                fully_shard(m)
        if args.compile:
            model.compile()
        if d.enabled and not args.fsdp:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if
                                                        d.device.type == "cuda" else None)
        self.model, self.ema = model, ema
        self.opt = torch.optim.AdamW(model.parameters(), lr=self.recipe["lr"], weight_decay=args.weight_decay,
                                     betas=(0.9, 0.999), fused=d.device.type == "cuda" and not args.fsdp)
        if self.resumed is not None:
            ckpt = self.resumed
            load_state_dicts(self.model, self.ema, self.opt, ckpt)
            self.step, self.epoch, self.index = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["index"])
            states = ckpt["rng"]
            if len(states) == d.world_size:
                set_rng_state(states[d.rank])
            else:
                self.log(f"WARNING: checkpoint has RNG states of {len(states)} processes, this run has "
                         f"{d.world_size}; per-rank RNGs are re-seeded (training draws are per-step, unaffected)")
            self.resumed = None  # free the memory

    # -- one step

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.d.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.model(x, t, y).float()

    def _draws(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's slice of the step's global draws: model input x, labels y (some dropped), t, noise."""
        dev, g_batch = self.d.device, self.global_batch
        g = step_generator(self.args.global_seed, self.step, dev)
        sl = slice(self.d.rank * self.local_batch, (self.d.rank + 1) * self.local_batch)
        shape = (g_batch, self.config.in_channels, *self.config.grid_input)
        t = torch.randint(0, self.diffusion.num_timesteps, (g_batch,), generator=g, device=dev)[sl]
        noise = torch.randn(shape, generator=g, device=dev)[sl]
        drop = (torch.rand(g_batch, generator=g, device=dev) < self.config.class_dropout_prob)[sl]
        y = torch.where(drop, torch.full_like(y, self.config.num_classes), y)
        if isinstance(self.dataset, LatentDataset):
            eps = torch.randn(shape, generator=g, device=dev)[sl]
            x = sample_latents(x, eps, self.dataset.scale_factor)
        elif self.vae is not None:
            eps = torch.randn(shape, generator=g, device=dev)[sl]
            mean, std = self.vae.encode_moments(x)
            x = sample_latents(torch.stack([mean, std], dim=1), eps, 0.18215)
        return x, y, t, noise

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One optimisation step on this rank's batch: x (n, C, H, W) data (images, latents or posterior moments
        (n, 2, C, h, w)), y (n,) labels. Returns the (unsynchronised) loss terms and the learning rate."""
        x, y, t, noise = self._draws(x.to(self.d.device, non_blocking=True), y.to(self.d.device, non_blocking=True))
        warm = self.recipe["warmup_steps"]
        lr = self.recipe["lr"] * (min(1.0, (self.step + 1) / warm) if warm else 1.0)
        for group in self.opt.param_groups:
            group["lr"] = lr
        terms = self.diffusion.training_losses(self._forward, x, t, model_kwargs={"y": y}, noise=noise)
        loss = terms["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.opt.step()
        update_ema(self.ema, _unwrap(self.model), ema_decay_at(self.step, self.recipe["ema_decay"],
                                                               self.recipe["ema_warmup"]))
        return {"loss": loss.detach(), "mse": terms["mse"].mean().detach(),
                "vb": terms["vb"].mean().detach() if "vb" in terms else torch.zeros(()), "lr": lr}

    # -- checkpoints

    def save_checkpoint(self) -> None:
        model_sd, ema_sd, opt_sd = state_dicts(self.model, self.ema, self.opt)
        states = [rng_state()]
        if self.d.enabled:
            states = [None] * self.d.world_size
            dist.all_gather_object(states, rng_state())
        if self.d.is_main:
            ckpt = {"format": CHECKPOINT_FORMAT, "model": model_sd, "ema": ema_sd, "opt": opt_sd,
                    "args": _jsonable(vars(self.args)), "config": self.config.to_dict(), "step": self.step,
                    "epoch": self.epoch, "index": self.index, "rng": states, "world_size": self.d.world_size,
                    "global_batch_size": self.global_batch}
            path = self.ckpt_dir / f"{self.step:07d}.pt"
            atomic_save(ckpt, path)
            for old in list_checkpoints(self.ckpt_dir)[: -self.args.keep_last]:
                old.unlink(missing_ok=True)
            self.log(f"saved checkpoint {path}")
        if self.d.enabled:
            dist.barrier()

    # -- loop

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = StepBatchSampler(len(self.dataset), self.global_batch, self.d.rank, self.d.world_size,
                                   self.args.global_seed, flips=not isinstance(self.dataset, DigitsDataset),
                                   start_epoch=self.epoch, start_index=self.index,
                                   num_steps=self.total_steps - self.step)
        if isinstance(self.dataset, DigitsDataset):  # in memory: index directly, no loader overhead
            for keys in sampler:
                idx = torch.tensor([k[0] for k in keys])
                yield self.dataset.images[idx], self.dataset.labels[idx]
            return
        yield from torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.args.num_workers,
                                               collate_fn=collate, pin_memory=self.d.device.type == "cuda",
                                               persistent_workers=False)

    def run(self) -> None:
        args, d = self.args, self.d
        self.log(f"DiT {self.config} | {self.params:,} parameters | impl {args.impl or 'fast'} | "
                 f"{len(self.dataset):,} samples ({args.data_path or 'built-in digits'}) | world size "
                 f"{d.world_size} | global batch {self.global_batch} | steps {self.step} -> {self.total_steps} | "
                 f"device {d.device} | dtype {self.dtype} | results {self.exp_dir}")
        if d.is_main:
            (self.exp_dir / "config.json").write_text(json.dumps(
                {"model": self.config.to_dict(), "recipe": self.recipe, "args": _jsonable(vars(args))}, indent=1))
        steps_per_epoch = len(self.dataset) // self.global_batch
        train_flops = 3 * 2e9 * gflops(self.config)  # per image: forward + backward (2x), 2 flops per MAC
        peak = peak_flops(d.device, self.dtype)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not d.is_main or args.no_progress,
                   desc="train", dynamic_ncols=True)
        self.log.bar = bar
        window: list[dict[str, torch.Tensor]] = []
        t0 = time.perf_counter()
        start = t0
        for x, y in self.batches():
            if self.index + self.global_batch > len(self.dataset):
                self.epoch, self.index = self.epoch + 1, 0
            window.append(self.train_step(x, y))
            self.step += 1
            self.index += self.global_batch
            bar.update(1)
            if self.step % self.recipe["log_every"] == 0 or self.step == self.total_steps:
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                sps = len(window) / (now - t0)
                loss = all_reduce_mean(torch.stack([w["loss"] for w in window]).mean().item(), d)
                mse = all_reduce_mean(torch.stack([w["mse"] for w in window]).mean().item(), d)
                vb = all_reduce_mean(torch.stack([w["vb"] for w in window]).mean().item(), d)
                ips = sps * self.global_batch
                mfu = ips * train_flops / (peak * d.world_size) if peak else None
                msg = (f"(step={self.step:07d}) loss {loss:.4f} (mse {mse:.4f}, vb {vb:.4f}), lr "
                       f"{window[-1]['lr']:.2e}, {sps:.2f} steps/s, {ips:.1f} img/s"
                       + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
                self.log(msg)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
                self.log.row({"step": self.step, "epoch": self.epoch, "loss": loss, "mse": mse, "vb": vb,
                              "lr": window[-1]["lr"], "steps_per_sec": sps, "images_per_sec": ips,
                              "mfu": "" if mfu is None else mfu, "elapsed_s": now - start})
                window, t0 = [], time.perf_counter()
            if self.step % self.recipe["ckpt_every"] == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.log.bar = None
        self.log(f"done: {self.step} steps ({self.step / max(steps_per_epoch, 1):.1f} epochs) in "
                 f"{time.perf_counter() - start:.1f} s; checkpoints in {self.ckpt_dir}")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list))}


# ---------------------------------------------------------------------------------------------------- digits demo

def evaluate_digits_run(trainer: Trainer, args: argparse.Namespace) -> dict[str, float]:
    """Sample the trained EMA model on every digit class, write a grid PNG, score guided and unguided samples."""
    from dit_fast.metrics import evaluate_digits
    from dit_fast.sample import generate, save_grid

    ema = trainer.ema
    n = args.eval_samples
    labels = torch.arange(n) % trainer.config.num_classes
    results: dict[str, float] = {}
    grid = None
    for name, scale in (("unguided", 1.0), ("guided", args.eval_cfg_scale)):
        t0 = time.perf_counter()
        samples = generate(ema, labels, sampler=args.eval_sampler, num_steps=args.eval_steps, cfg_scale=scale,
                           guide_channels="all", seed=args.global_seed, batch_size=n, device=trainer.d.device,
                           clip_denoised=True, progress=False)
        scores = evaluate_digits(samples, labels)
        trainer.log(f"{name} (cfg {scale}, {args.eval_sampler}-{args.eval_steps}, {n} samples): class accuracy "
                    f"{100 * scores['accuracy']:.1f}%, Frechet distance {scores['frechet']:.3f} "
                    f"({time.perf_counter() - t0:.1f} s)")
        results.update({f"{name}_{k}": v for k, v in scores.items()})
        if scale != 1.0:
            grid = samples
    grid_path = trainer.exp_dir / "samples.png"
    first = labels[:100]
    save_grid(grid[:100][torch.argsort(first, stable=True)], grid_path, nrow=10)  # a row per class
    results["grid"] = str(grid_path)
    (trainer.exp_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    trainer.log(f"sample grid (guided, a row per digit) written to {grid_path}")
    return results


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data and model (official flag names)")
    g.add_argument("--data-path", default=None,
                   help="image folder (ImageNet layout, needs --vae) or a latent folder from `dit-fast "
                        "extract-latents`; default: the built-in digits")
    g.add_argument("--results-dir", default="results", help="experiment folders NNN-<model> are created here")
    g.add_argument("--model", default=None, choices=list(CONFIGS),
                   help="model config (default: DiT-XL/2, or a 0.3M-parameter DiT for the built-in digits)")
    g.add_argument("--image-size", type=int, default=None, help="pixel side (default 256; 8 for the digits)")
    g.add_argument("--num-classes", type=int, default=None, help="default: the number of classes in the data")
    g.add_argument("--vae", default=None, help="LOCAL diffusers AutoencoderKL folder, for image-folder data")
    for name, what in (("hidden-size", "width"), ("depth", "number of blocks"), ("num-heads", "attention heads"),
                       ("patch-size", "patch side")):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the model's {what}")
    g.add_argument("--num-workers", type=int, default=4, help="data-loading worker processes (image folders)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="default 1400 (official); 1000 for the digits")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (default: the epochs' worth; 8000 for the digits)")
    g.add_argument("--global-batch-size", type=int, default=None, help="default 256 (official); 32 for the digits")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4; 2e-3 for the digits)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear LR warm-up steps (default 0; 100 digits)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--ema-decay", type=float, default=None, help="default 0.9999 (official); 0.999 for the digits")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA decay min(decay, (1+step)/(10+step)), for short runs (default: on for the digits)")
    g.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (default: no clipping)")
    g.add_argument("--diffusion-steps", type=int, default=1000)
    g.add_argument("--global-seed", type=int, default=0)
    g = parser.add_argument_group("performance")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU); weights and optimizer stay fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for tensor ops (default: 1 for the small digits model, whose matmuls are too "
                        "small to split; else PyTorch's)")
    g.add_argument("--impl", choices=["fast", "reference"], default=None,
                   help="DiTFast (fused kernels, the default) or the plain reference model")
    g.add_argument("--attention", default="auto", help="attention backend of the fast model")
    g.add_argument("--kernels", default="auto", help="kernel backend of the fast model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")
    g = parser.add_argument_group("logging, checkpoints, evaluation")
    g.add_argument("--log-every", type=int, default=None, help="default 100 (500 for the digits)")
    g.add_argument("--ckpt-every", type=int, default=None, help="default 50000 (2000 for the digits)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (older ones are deleted)")
    g.add_argument("--resume", default=None,
                   help="'auto' (newest checkpoint under --results-dir, if any), an experiment folder or a .pt")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=None,
                   help="after training the digits: sample, write a grid, report accuracy and Frechet distance")
    g.add_argument("--eval-samples", type=int, default=1000, help="digits evaluation: samples (classes cycle)")
    g.add_argument("--eval-cfg-scale", type=float, default=2.0, help="digits evaluation: guidance scale")
    g.add_argument("--eval-sampler", choices=["ddpm", "ddim", "dpm++"], default="ddpm")
    g.add_argument("--eval-steps", type=int, default=100)


def main(args: argparse.Namespace) -> int:
    """Train a DiT (with no arguments: a small one on the built-in digits, then sample and score it)."""
    for name in ("keep_last", "eval_samples", "diffusion_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"dit-fast train: --{name.replace('_', '-')} must be >= 1")
    if args.eval and args.data_path is not None:
        raise SystemExit("dit-fast train: --eval scores the built-in digits only; for other data run `dit-fast "
                         "sample --npz` and the ADM evaluator")
    try:
        d = setup_distributed(args.device)
    except RuntimeError as e:
        raise SystemExit(f"dit-fast train: {e}") from None
    threads = resolve_recipe(args)["threads"]
    if threads is not None and d.device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        trainer = Trainer(args, d)
        trainer.run()
        if args.data_path is None and args.eval is not False and d.is_main:
            evaluate_digits_run(trainer, args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        raise SystemExit(f"dit-fast train: {e}") from None
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # also launchable as a script: torchrun dit_fast/train.py --data-path ...
    import sys

    from dit_fast.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
