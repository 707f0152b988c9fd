"""The training loop (``Trainer``): one process (CPU or GPU), DDP across ``torchrun`` processes, or FSDP.

With no arguments, ``dit-fast train`` (``dit_fast.commands.train``) trains a small DiT on the built-in handwritten
digits (scikit-learn's, pixel space, no download) in a few minutes on a laptop CPU, then samples a grid and scores it
(``dit_fast.sampling.metrics``). With ``--data-path`` it trains on an image folder (ImageNet layout; encoded online by
``--vae``) or on a latent folder from ``dit-fast extract-latents``, with the official recipe's defaults (DiT-XL/2, AdamW
lr 1e-4, no weight decay, global batch 256, EMA 0.9999):

    torchrun --nproc_per_node 8 -m dit_fast.cli train --data-path latents/ --model DiT-XL/2

Settings are one ``TrainConfig`` (``dit_fast.training.config``: the flags, the digits and official recipes); processes
come from ``dit_fast.utils.distributed``; checkpoints and resume from ``dit_fast.training.state``. ARCHITECTURE.md at
the repository root draws one training step through these modules.

How a run stays deterministic and what a checkpoint holds: docs/training.md.
"""

from __future__ import annotations

import csv
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dit_fast.diffusion import TimeSampling, create_diffusion, create_transport
from dit_fast.models.config import DiTConfig, gflops
from dit_fast.models.dit import DiTFast
from dit_fast.models.fp8 import enable_fp8
from dit_fast.models.vae import SCALE_FACTOR, VAE
from dit_fast.reference import DiT, check_labels
from dit_fast.sampling.metrics import evaluate_digits_model
from dit_fast.training.config import TrainConfig
from dit_fast.training.data import (
    DigitsDataset,
    ImageFolderDataset,
    LatentDataset,
    StepBatchSampler,
    build_dataset,
    collate,
    sample_latents,
)
from dit_fast.training.state import (
    check_finite_losses,
    find_resume,
    load_state_dicts,
    new_experiment_dir,
    remove_partial_files,
    save_train_checkpoint,
    seed_everything,
    set_rng_state,
)
from dit_fast.utils.distributed import Dist, StopSignals, all_reduce_mean, broadcast_object, compile_and_shard
from dit_fast.utils.hardware import peak_flops
from dit_fast.utils.lifecycle import init_worker, pause_point, worker_errors
from dit_fast.utils.runlock import RunLock, discard_if_empty, run_folder_of
from dit_fast.utils.seeds import mix_seed
from dit_fast.utils.validation import Interrupted, UserError, check_free_space


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of training step ``step``'s per-sample draws, identical on every rank."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, 1 << 20, step))


def build_model(config: DiTConfig, impl: str = "reference", attention: str = "auto", kernels: str = "auto"
                ) -> nn.Module:
    """A freshly initialised DiT for ``config``: "reference" (plain PyTorch) or "fast" (DiTFast)."""
    if impl == "reference":
        return DiT.from_config(config)
    if impl == "fast":
        return DiTFast.from_config(config, kernels=kernels, attention=attention)
    raise ValueError(f"unknown --impl {impl!r}; choose 'fast' or 'reference'")


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over the parameters (the official update)."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]  # same registration order (wrappers keep it)
    if len(params) != len(ema_params):
        raise ValueError(f"EMA has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # one fused pass: ema += (1 - decay) * (model - ema)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay after ``step`` updates: ``decay``, or with warm-up ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


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


class Trainer:
    """Holds the run's state; ``run()`` trains from ``self.step`` to ``self.total_steps``.

    ``cfg``: the run's ``TrainConfig`` (unset fields are filled from its recipe).
    """

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg, self.d = cfg.resolved(), d
        requested_size, cfg = cfg.image_size, self.cfg
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype or
                                                                   ("bf16" if d.device.type == "cuda" else "fp32")]
        self.dataset = build_dataset(cfg.data_path, cfg.image_size)
        self._check_dataset(requested_size)
        self.vae = None
        if isinstance(self.dataset, LatentDataset):
            in_channels, input_size = self.dataset.in_channels, self.dataset.latent_size
        elif isinstance(self.dataset, ImageFolderDataset):
            if cfg.vae is None:
                raise ValueError("training on an image folder needs --vae (a local AutoencoderKL folder, e.g. "
                                 "stabilityai/sd-vae-ft-ema downloaded), or pre-extract latents with "
                                 "`dit-fast extract-latents`")
            self.vae = VAE(cfg.vae, device=d.device)
            if cfg.image_size % self.vae.downsample:
                raise ValueError(f"--image-size {cfg.image_size} is not a multiple of the VAE's downsampling factor "
                                 f"{self.vae.downsample}")
            in_channels, input_size = self.vae.latent_channels, cfg.image_size // self.vae.downsample
        else:
            in_channels, input_size = self.dataset.in_channels, cfg.image_size
        self.config = cfg.model_config(in_channels, input_size, self.dataset.num_classes)
        self.global_batch = int(cfg.global_batch_size)
        if self.global_batch % d.world_size:
            raise ValueError(f"--global-batch-size {self.global_batch} is not divisible by the {d.world_size} "
                             "processes")
        self.local_batch = self.global_batch // d.world_size
        steps_per_epoch = len(self.dataset) // self.global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.dataset)} samples, fewer than one global batch of "
                             f"{self.global_batch}; lower --global-batch-size")
        epoch_steps = int(cfg.epochs) * steps_per_epoch
        self.total_steps = epoch_steps if cfg.max_steps is None else min(int(cfg.max_steps), epoch_steps)
        self.diffusion = create_diffusion(timestep_respacing="", diffusion_steps=cfg.diffusion_steps)
        self.time_sampling = TimeSampling.parse(cfg.time_sampling)
        self.transport = (create_transport(cfg.path_type, cfg.prediction, cfg.loss_weight, cfg.train_eps,
                                           cfg.sample_eps, self.time_sampling) if cfg.objective == "flow" else None)
        self.step, self.epoch, self.index, self.saved_step = 0, 0, 0, None
        self.resumed: dict[str, Any] | None = None
        self.log, self.exp_dir, self.lock, self.created = RunLog(None), None, None, False
        self.notes = list(getattr(self.dataset, "notes", []))  # logged once the folder exists
        if (found := find_resume(cfg.resume, cfg.results_dir, self.config, d)) is not None:
            self.resumed, path = found
            self.exp_dir = run_folder_of(path)  # None: a checkpoint outside a run folder starts a new one
            self.notes.append(f"resuming from {path} (step {self.resumed['step']})" + (
                "" if self.exp_dir else "; it is not in a run folder, so this run gets a new one"))
        self._build()
        check_free_space(self.exp_dir or cfg.results_dir, 16 * self.params,  # model, EMA, AdamW's two moments
                         f"--results-dir {cfg.results_dir} (a checkpoint of {self.params:,} parameters)")

    # -- setup

    def _check_dataset(self, requested_size: int | None) -> None:
        """A latent folder fixes the image size: an explicit, different ``--image-size`` is refused."""
        ds = self.dataset
        if isinstance(ds, LatentDataset) and requested_size is not None and requested_size != ds.image_size:
            raise UserError(f"--image-size {requested_size}: the latent folder {self.cfg.data_path} was extracted at "
                            f"{ds.image_size} (latents {ds.latent_size}); drop --image-size or extract again")

    def _setup_folder(self) -> None:
        """The run folder (a new NNN-<model> unless resuming in one), locked for this process (``RunLock``: a second
        writer fails naming this one), then the temporaries of killed writers swept."""
        cfg, d = self.cfg, self.d
        if self.exp_dir is None:
            name = cfg.model or ("DiT-digits" if cfg.data_path is None else "DiT-XL/2")
            path = new_experiment_dir(cfg.results_dir, name) if d.is_main else None
            self.exp_dir = Path(broadcast_object(None if path is None else str(path), d))
            self.created = True
        if d.is_main:
            self.lock = RunLock(self.exp_dir).acquire()
            remove_partial_files(self.exp_dir / "checkpoints")
        self.ckpt_dir = self.exp_dir / "checkpoints"
        self.log = RunLog(self.exp_dir if d.is_main else None)
        for note in self.notes:
            self.log(note)

    def _build(self) -> None:
        cfg, d = self.cfg, self.d
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.global_seed)  # identical initial weights on every rank and for every world size
        model = build_model(self.config, cfg.impl, cfg.attention, cfg.kernels).to(d.device)
        ema = build_model(self.config, cfg.impl, cfg.attention, cfg.kernels).to(d.device)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False).eval()
        model.eval()  # label dropout is applied by the trainer, per global sample (see the module docstring)
        seed_everything(cfg.global_seed * d.world_size + d.rank)  # per-rank seed, as the official script
        self.params = sum(p.numel() for p in model.parameters())
        model.gradient_checkpointing = cfg.grad_checkpointing
        if cfg.fp8:
            enable_fp8(model)  # the block linears in FP8; refuses in one line where the device cannot
        compile_and_shard(model, ema, compile=cfg.compile, fsdp=cfg.fsdp,  # FSDP: blocks compiled, then sharded
                          param_dtype=self.dtype)
        if d.enabled and not cfg.fsdp:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if
                                                        d.device.type == "cuda" else None)
        self.model, self.ema = model, ema
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.999), fused=d.device.type == "cuda" and not cfg.fsdp)
        if self.resumed is not None:
            ckpt = self.resumed
            load_state_dicts(self.model, self.ema, self.opt, ckpt)
            self.step, self.epoch, self.index = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["index"])
            self.saved_step = self.step
            states = ckpt["rng"]
            if len(states) == d.world_size:
                set_rng_state(states[d.rank])
            else:
                self.notes.append(f"WARNING: checkpoint has RNG states of {len(states)} processes, this run "
                                  f"{d.world_size}; per-rank RNGs are re-seeded (training draws are per-step)")
            self.resumed = None  # free the memory

    # -- one step

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.d.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.model(x, t, y).float()

    def _draws(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's slice of the step's global draws: model input x, labels y (some dropped), t, noise."""
        dev, g_batch = self.d.device, self.global_batch
        g = step_generator(self.cfg.global_seed, self.step, dev)
        sl = slice(self.d.rank * self.local_batch, (self.d.rank + 1) * self.local_batch)
        shape = (g_batch, self.config.in_channels, *self.config.grid_input)
        if self.transport is not None:
            t = self.transport.sample_time(g_batch, generator=g, device=dev)[sl]  # flow times in [0, 1]
        elif self.time_sampling.kind == "uniform":  # the official draw (bit-identical to before)
            t = torch.randint(0, self.diffusion.num_timesteps, (g_batch,), generator=g, device=dev)[sl]
        else:
            t = self.time_sampling.ddpm_timesteps(g_batch, self.diffusion.num_timesteps, generator=g, device=dev)[sl]
        noise = torch.randn(shape, generator=g, device=dev)[sl]
        drop = (torch.rand(g_batch, generator=g, device=dev) < self.config.class_dropout_prob)[sl]
        y = torch.where(drop, torch.full_like(y, self.config.num_classes), y)
        if isinstance(self.dataset, LatentDataset):
            eps = torch.randn(shape, generator=g, device=dev)[sl]
            x = sample_latents(x, eps, self.dataset.scale_factor)
        elif self.vae is not None:
            eps = torch.randn(shape, generator=g, device=dev)[sl]
            mean, std = self.vae.encode_moments(x)
            x = sample_latents(torch.stack([mean, std], dim=1), eps, SCALE_FACTOR)
        return x, y, t, noise

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One optimisation step on this rank's batch: x (n, C, H, W) data (images, latents or posterior moments
        (n, 2, C, h, w)), y (n,) labels. Returns the (unsynchronised) loss terms and the learning rate."""
        if y.device.type == "cpu":  # once per batch, on the host: the model's forward never reads device labels
            check_labels(y, self.config.num_classes, what="dataset labels")
        x, y, t, noise = self._draws(x.to(self.d.device, non_blocking=True), y.to(self.d.device, non_blocking=True))
        warm = self.cfg.warmup_steps
        lr = self.cfg.lr * (min(1.0, (self.step + 1) / warm) if warm else 1.0)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.transport is not None:
            terms = self.transport.training_losses(self._forward, x, {"y": y}, t=t, noise=noise)
            terms["mse"] = terms["loss"]
        else:
            terms = self.diffusion.training_losses(self._forward, x, t, model_kwargs={"y": y}, noise=noise)
        loss = terms["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        update_ema(self.ema, _unwrap(self.model), ema_decay_at(self.step, self.cfg.ema_decay, self.cfg.ema_warmup))
        out = {"loss": loss.detach(), "mse": terms["mse"].mean().detach(), "lr": lr}
        return out | ({"vb": terms["vb"].mean().detach()} if "vb" in terms else {})  # no bound term: flow, fixed sigma

    # -- checkpoints

    def save_checkpoint(self, window: list[dict[str, Any]]) -> None:
        """Save this step's checkpoint, unless a loss of ``window`` (the steps since the last check) diverged."""
        check_finite_losses(window, self.step, self.saved_step, self.ckpt_dir, self.d)
        path = save_train_checkpoint(self.ckpt_dir, self.step, self.model, self.ema, self.opt, self.d,
                                     self.cfg.keep_last, args=self.cfg.to_dict(), config=self.config.to_dict(),
                                     epoch=self.epoch, index=self.index, global_batch_size=self.global_batch,
                                     objective=self.objective())
        self.saved_step = self.step
        if path is not None:
            self.log(f"saved checkpoint {path}")

    def objective(self) -> dict[str, Any]:
        """The training objective as checkpoints store it: {"name": "ddpm" | "flow", ...its settings}."""
        if self.transport is not None:
            return {"name": "flow", **self.transport.to_dict()}
        return {"name": "ddpm", "diffusion_steps": self.cfg.diffusion_steps, "time_sampling": self.time_sampling.spec}

    # -- loop

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = StepBatchSampler(len(self.dataset), self.global_batch, self.d.rank, self.d.world_size,
                                   self.cfg.global_seed, flips=not isinstance(self.dataset, DigitsDataset),
                                   start_epoch=self.epoch, start_index=self.index,
                                   num_steps=self.total_steps - self.step)
        if isinstance(self.dataset, DigitsDataset):  # in memory: index directly, no loader overhead
            for keys in sampler:
                idx = torch.tensor([k[0] for k in keys])
                yield self.dataset.images[idx], self.dataset.labels[idx]
            return
        yield from torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                                               collate_fn=collate, pin_memory=self.d.device.type == "cuda",
                                               persistent_workers=False, worker_init_fn=init_worker)

    def _next(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], stop: StopSignals
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next batch; None at the end, or when a stop signal also ended the data-loading workers (a scheduler's
        SIGTERM to the whole job), so that the run still saves its checkpoint."""
        try:
            return next(batches, None)
        except RuntimeError:
            if stop.signum is None:
                raise
            return None

    def log_window(self, window: list[dict[str, torch.Tensor]], t0: float, start: float, train_flops: float,
                   peak: float | None, bar: tqdm) -> None:
        """Log the steps of ``window`` (since ``t0``): losses averaged over ranks, speed, MFU; terminal and CSV."""
        d = self.d
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        sps = len(window) / (now - t0)
        loss = all_reduce_mean(torch.stack([w["loss"] for w in window]).mean().item(), d)
        mse = all_reduce_mean(torch.stack([w["mse"] for w in window]).mean().item(), d)
        vb = all_reduce_mean(torch.stack([w["vb"] for w in window]).mean().item(), d) if "vb" in window[0] else ""
        ips = sps * self.global_batch
        mfu = ips * train_flops / (peak * d.world_size) if peak else None
        terms = f"mse {mse:.4f}, vb {vb:.4f}" if vb != "" else f"mse {mse:.4f}"
        self.log(f"(step={self.step:07d}) loss {loss:.4f} ({terms}), lr {window[-1]['lr']:.2e}, "
                 f"{sps:.2f} steps/s, {ips:.1f} img/s" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
        self.log.row({"step": self.step, "epoch": self.epoch, "loss": loss, "mse": mse, "vb": vb,
                      "lr": window[-1]["lr"], "steps_per_sec": sps, "images_per_sec": ips,
                      "mfu": "" if mfu is None else mfu, "elapsed_s": now - start})

    def run(self) -> None:
        """Make (or lock) the run folder and train; a new run stopped before its first checkpoint (an error, Ctrl-C
        or SIGTERM in its first seconds) leaves no folder behind."""
        try:
            self._setup_folder()
            pause_point("train:setup")  # fault-injection tests: the folder exists, no checkpoint yet
            self._train()
        except BaseException:
            if self.d.is_main and self.created and discard_if_empty(self.exp_dir):
                self.exp_dir = None
            raise

    def close(self) -> None:
        """Release the run folder (the lock is held from ``run`` until here: the evaluation writes there too)."""
        if self.lock is not None:
            self.lock.release()

    def _train(self) -> None:
        cfg, d = self.cfg, self.d
        self.log(f"DiT {self.config} | {self.params:,} parameters | impl {cfg.impl} | "
                 f"{len(self.dataset):,} samples ({cfg.data_path or 'built-in digits'}) | world size "
                 f"{d.world_size} | global batch {self.global_batch} | steps {self.step} -> {self.total_steps} | "
                 f"device {d.device} | dtype {self.dtype} | results {self.exp_dir}")
        if d.is_main:
            recipe = {k: getattr(cfg, k) for k in cfg.recipe}
            (self.exp_dir / "config.json").write_text(json.dumps(
                {"model": self.config.to_dict(), "recipe": recipe, "args": cfg.to_dict()}, indent=1))
        steps_per_epoch = len(self.dataset) // self.global_batch
        train_flops = 3 * 2e9 * gflops(self.config)  # per image: forward + backward (2x), 2 flops per MAC
        peak = peak_flops(d.device, self.dtype)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not d.is_main or cfg.no_progress,
                   desc="train", dynamic_ncols=True)
        self.log.bar = bar
        window: list[dict[str, torch.Tensor]] = []
        t0 = time.perf_counter()
        start = t0
        with StopSignals() as stop, worker_errors():
            batches = self.batches()
            while not stop.requested(d) and (batch := self._next(batches, stop)) is not None:
                if self.index + self.global_batch > len(self.dataset):
                    self.epoch, self.index = self.epoch + 1, 0
                window.append(self.train_step(*batch))
                self.step += 1
                self.index += self.global_batch
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    check_finite_losses(window, self.step, self.saved_step, self.ckpt_dir, d)
                    self.log_window(window, t0, start, train_flops, peak, bar)
                    window, t0 = [], time.perf_counter()
                if self.step % cfg.ckpt_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint(window)
            if stop.signum is not None:  # keep the steps done (the same atomic save), then exit 128 + the signal
                if self.saved_step != self.step:
                    self.log(f"stopping at step {self.step}: saving a checkpoint (Ctrl-C again quits without saving)")
                    self.save_checkpoint(window)
                raise Interrupted(f"interrupted by {signal.Signals(stop.signum).name} at step {self.step}; saved "
                                  f"checkpoint {self.ckpt_dir / f'{self.step:07d}.pt'} (continue with --resume "
                                  f"{self.exp_dir})", stop.signum)
        bar.close()
        self.log.bar = None
        self.log(f"done: {self.step} steps ({self.step / max(steps_per_epoch, 1):.1f} epochs) in "
                 f"{time.perf_counter() - start:.1f} s; checkpoints in {self.ckpt_dir}")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def evaluate_digits_run(trainer: Trainer) -> dict[str, Any]:
    """Sample the trained EMA model on every digit class, write a grid PNG, score guided and unguided samples."""
    cfg = trainer.cfg
    sampler = cfg.eval_sampler or ("ddpm" if trainer.transport is None else "ode-heun")
    steps = cfg.eval_steps or (26 if sampler == "ode-heun" else 100)
    return evaluate_digits_model(trainer.ema, trainer.exp_dir, num_samples=cfg.eval_samples,
                                 cfg_scale=cfg.eval_cfg_scale, sampler=sampler, num_steps=steps,
                                 seed=cfg.global_seed, device=trainer.d.device, log=trainer.log,
                                 transport=trainer.transport)
