"""Training state on disk: the resumable training checkpoint, its RNG states, finding one to resume from, and the
check that keeps diverged (NaN) weights from being saved.

Beside ``dit_fast.checkpoints`` (model weights in every format, for sampling and conversion), this module holds what
``dit_fast.training.trainer`` needs to continue a run exactly: a checkpoint ``<exp>/checkpoints/<step:07d>.pt`` is a
dict with "format" ("dit-fast-train-v1"), "model", "ema", "opt" (full, unsharded state dicts), "args" (the run's
``TrainConfig`` as a dict), "config" (``DiTConfig.to_dict()``), "step", "epoch", "index" (the data position),
"rng" (every process's RNG states), "world_size" and "global_batch_size": a superset of the official train.py
checkpoints ("model", "ema", "opt", "args"), so ``dit_fast.checkpoints.load_checkpoint`` reads its EMA weights.
Files are written atomically (``dit_fast.utils.files``) and the last ``keep_last`` kept.
"""

from __future__ import annotations

import glob
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dit_fast.checkpoints import check_finite_weights, describe_load_error
from dit_fast.models.config import DiTConfig
from dit_fast.utils.distributed import Dist, all_gather_object, all_reduce_max, barrier, broadcast_object
from dit_fast.utils.files import atomic_save, sweep_stale_temps_in
from dit_fast.utils.validation import UserError

CHECKPOINT_FORMAT = "dit-fast-train-v1"
CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")
RESUME_KEYS = ("model", "ema", "opt", "config", "step", "epoch", "index", "rng")


# ---------------------------------------------------------------------------------------------------- RNG states

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
    """Restore what ``rng_state`` returned (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------- state dicts

def state_dicts(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded, CPU) state dicts of model, EMA and optimizer, whatever the wrapping (DDP, FSDP, compile).
    A collective under FSDP: every rank calls it."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts), get_model_state_dict(ema, options=opts),
            get_optimizer_state_dict(model, opt, options=opts))


def load_state_dicts(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, ckpt: dict[str, Any]) -> None:
    """Load a training checkpoint's full model, EMA and optimizer state dicts into (possibly wrapped) modules."""
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    set_model_state_dict(ema, ckpt["ema"], options=opts)
    set_optimizer_state_dict(model, opt, ckpt["opt"], options=opts)


# ---------------------------------------------------------------------------------------------------- files

def save_train_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
                          d: Dist, keep_last: int, **fields: Any) -> Path | None:
    """Write ``ckpt_dir/<step:07d>.pt`` (rank 0; every rank must call: gathers state and RNGs) with the model, EMA,
    optimizer, every rank's RNG states and ``fields`` (step, epoch, index, args, config, ...); keep the last
    ``keep_last``. Returns the path on rank 0, else None."""
    model_sd, ema_sd, opt_sd = state_dicts(model, ema, opt)
    states = all_gather_object(rng_state(), d)
    path = None
    if d.is_main:
        ckpt = {"format": CHECKPOINT_FORMAT, "model": model_sd, "ema": ema_sd, "opt": opt_sd, "step": step,
                "rng": states, "world_size": d.world_size, **fields}
        path = atomic_save(ckpt, ckpt_dir / f"{step:07d}.pt")
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    barrier(d)
    return path


def remove_partial_files(ckpt_dir: Path) -> None:
    """Delete temporary files left in ``ckpt_dir`` by a run killed while writing a checkpoint (only those of
    processes that are gone: ``files.sweep_stale_temps_in``; the run folder's lock keeps a live writer out)."""
    sweep_stale_temps_in(ckpt_dir)


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
        raise ValueError(describe_load_error(path, e)) from None
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
    if len(problems) == 1:
        raise ValueError(problems[0])
    raise ValueError(f"no readable checkpoint to resume from ({len(problems)} tried): " + "; ".join(problems))


def find_resume(resume: str | None, results_dir: str, config: DiTConfig, d: Dist) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint ``--resume`` continues from and its path (rank 0 chooses, every rank loads it), checked to
    hold finite weights of ``config``'s model; None without ``--resume`` or when "auto" finds nothing."""
    found = None
    if resume is not None and d.is_main:
        found = resolve_resume(resume, results_dir, print)
        if found is None:
            print(f"--resume auto: no checkpoint under {results_dir!r}; starting a new run")
    path = broadcast_object(None if found is None else str(found[1]), d)
    if path is None:
        return None
    ckpt = found[0] if found is not None else load_train_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        what = "no optimizer state ('opt')" if missing == ["opt"] else f"no {', '.join(map(repr, missing))}"
        raise ValueError(f"{path} has {what}: it cannot be resumed exactly; to fine-tune from its weights, load them "
                         "with dit_fast.checkpoints")
    check_finite_weights(ckpt["model"], path)
    saved = DiTConfig.from_dict(ckpt["config"])
    if saved != config:
        diff = {f: (getattr(saved, f), getattr(config, f)) for f in saved.to_dict()
                if getattr(saved, f) != getattr(config, f)}
        raise ValueError(f"checkpoint {path} is of another model config; differing fields (checkpoint, this run): "
                         f"{diff}")
    return ckpt, Path(path)


def check_finite_losses(window: list[dict[str, Any]], step: int, saved_step: int | None, ckpt_dir: Path,
                        d: Dist) -> None:
    """UserError if a loss of ``window`` (the steps up to ``step`` since the last check, each a dict with "loss" and
    "lr") is NaN or infinite on any process: the weights diverged, and saving them would push the good checkpoints
    out, so the run stops without saving."""
    losses = torch.stack([w["loss"] for w in window]).float().cpu() if window else torch.zeros(0)
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if not all_reduce_max(len(bad), d):
        return
    where = (f"at step {step - len(window) + 1 + bad[0]} (loss {losses[bad[0]].item()}, lr {window[bad[0]]['lr']:.2e})"
             if bad else "on another process")
    saved = f"the last good checkpoint is step {saved_step} in {ckpt_dir}" if saved_step else "no checkpoint yet"
    raise UserError(f"training diverged: the loss became non-finite {where}; stopped without saving the diverged "
                    f"weights ({saved}); lower --lr, or clip with --max-grad-norm")


def _ckpt_step(path: Path) -> int:
    m = CHECKPOINT_NAME.match(path.name)
    return int(m.group(1)) if m else 1 << 62


def new_experiment_dir(results_dir: str, model_name: str) -> Path:
    """Create ``results_dir/NNN-<model>/checkpoints`` with the next free index NNN; returns the experiment folder."""
    os.makedirs(results_dir, exist_ok=True)
    index = len(glob.glob(os.path.join(results_dir, "*")))
    while True:
        path = Path(results_dir) / f"{index:03d}-{model_name.replace('/', '-')}"
        try:
            (path / "checkpoints").mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            index += 1
