"""Writing checkpoints: the dit-fast format, official ``.pt`` state dicts, diffusers folders; ``convert``.

Every file is written atomically (``dit_fast.utils.files.atomic_write``: a temporary file in the same folder, then
renamed), weights first: an interrupted save leaves the previous files intact, or new weights whose embedded config
disagrees with the old ``config.json``, which loading reports.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from dit_fast import __version__
from dit_fast.checkpoints.diffusers_layout import DIFFUSERS_WEIGHTS_NAME, to_diffusers_config, to_diffusers_state_dict
from dit_fast.checkpoints.format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    FORMATS,
    WEIGHTS_NAME,
    Checkpoint,
    CheckpointError,
    StateDict,
)
from dit_fast.checkpoints.infer import check_state_dict
from dit_fast.checkpoints.read import read_checkpoint, strip_prefixes
from dit_fast.models.config import DiTConfig
from dit_fast.reference import sincos_pos_embed_2d
from dit_fast.utils.files import atomic_write

Source = nn.Module | Checkpoint | Mapping[str, torch.Tensor]


def save_checkpoint(source: Source, path: str | os.PathLike, *, config: DiTConfig | None = None) -> Path:
    """Write the dit-fast format: a folder (config.json + model.safetensors), or one file if ``path`` ends in
    ``.safetensors``. ``source`` is a model with a ``.config``, a :class:`Checkpoint`, or a state dict with
    ``config=``. Writes are atomic. Returns ``path``.
    """
    state_dict, config = _weights_and_config(source, config)
    path = Path(path)
    file_meta = {"dit_fast.format_version": str(FORMAT_VERSION), "dit_fast.config": json.dumps(config.to_dict())}
    if isinstance(source, Checkpoint) and source.objective:
        file_meta["dit_fast.objective"] = json.dumps(source.objective)  # the training objective travels along
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: safetensors.torch.save_file(state_dict, str(tmp), metadata=file_meta))
        return path
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder (the dit-fast format is a folder, or a path ending "
                              "in .safetensors)")
    meta = {"format": "dit-fast", "format_version": FORMAT_VERSION, "dit_fast_version": __version__,
            "config": config.to_dict(), "weights": WEIGHTS_NAME,
            "dtype": str(next(iter(state_dict.values())).dtype).removeprefix("torch.")}
    atomic_write(path / WEIGHTS_NAME,
                  lambda tmp: safetensors.torch.save_file(state_dict, str(tmp), metadata=file_meta))
    atomic_write(path / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def save_official(source: Source, path: str | os.PathLike, *, config: DiTConfig | None = None) -> Path:
    """Write a bare official state dict (as ``DiT-XL-2-256x256.pt``) with ``torch.save``, atomically.

    The official format stores no config: loading it back infers one (pass ``num_heads`` for non-zoo shapes).
    """
    state_dict, config = _weights_and_config(source, config)
    if config.per_block_conditioning:
        raise CheckpointError("the official layout has one shared timestep/label embedder, this model one per block "
                              "(per_block_conditioning): save it in the dit-fast or diffusers format")
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(state_dict, tmp))
    return path


def save_diffusers(source: Source, path: str | os.PathLike, *, config: DiTConfig | None = None) -> Path:
    """Write a diffusers ``DiTTransformer2DModel`` folder (config.json + diffusion_pytorch_model.safetensors).

    diffusers is not needed. The stored ``pos_embed`` is dropped (diffusers recomputes it; a warning says so when
    it is not the standard sin-cos table). Load it in diffusers with ``DiTTransformer2DModel.from_pretrained(path)``
    or place it as the ``transformer/`` of a ``DiTPipeline`` folder.
    """
    state_dict, config = _weights_and_config(source, config)
    diffusers_config = to_diffusers_config(config)
    table = sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None]
    if not torch.allclose(state_dict["pos_embed"].float(), table, atol=1e-5, rtol=0):
        warnings.warn("pos_embed is not the standard sin-cos table; diffusers recomputes the standard one, so its "
                      "outputs will differ from this model's", stacklevel=2)
    weights = to_diffusers_state_dict(state_dict, config)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder (a diffusers model is a folder)")
    atomic_write(path / DIFFUSERS_WEIGHTS_NAME,
                  lambda tmp: safetensors.torch.save_file(weights, str(tmp), metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME,
                  lambda tmp: tmp.write_text(json.dumps(diffusers_config, indent=2, sort_keys=True) + "\n"))
    return path


def write_checkpoint(source: Source, path: str | os.PathLike, to: str, *, config: DiTConfig | None = None) -> Path:
    """Write ``source`` in format ``to``: "dit-fast", "official" or "diffusers"."""
    writers = {"dit-fast": save_checkpoint, "official": save_official, "diffusers": save_diffusers}
    if to not in writers:
        raise ValueError(f"unknown checkpoint format {to!r}; valid formats: {', '.join(FORMATS)}")
    return writers[to](source, path, config=config)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, dtype: torch.dtype | None = None,
            **read_options: Any) -> Checkpoint:
    """Read ``src`` (any supported format; ``read_options`` as :func:`read_checkpoint`) and write it to ``dst`` in
    format ``to``, its floating-point weights cast to ``dtype`` if given (a bf16 file: half the size, and sampling
    in bf16 loads it without a cast). Returns the checkpoint that was read (its notes say what was decided)."""
    if to not in FORMATS:
        raise ValueError(f"unknown checkpoint format {to!r}; valid formats: {', '.join(FORMATS)}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"convert: dtype must be float32, bfloat16 or float16, got {dtype}")
    ckpt = read_checkpoint(src, **read_options)
    if dtype is not None:
        ckpt.state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
        ckpt.notes.append(f"weights cast to {str(dtype).removeprefix('torch.')}")
    write_checkpoint(ckpt, dst, to)
    return ckpt


def _weights_and_config(source: Source, config: DiTConfig | None) -> tuple[StateDict, DiTConfig]:
    """Detached CPU contiguous official-layout weights and their config, checked against each other."""
    if isinstance(source, Checkpoint):
        state_dict, config = source.state_dict, config or source.config
    elif isinstance(source, nn.Module):
        config = config or getattr(source, "config", None)
        if not isinstance(config, DiTConfig):
            raise TypeError(f"{type(source).__name__} has no DiTConfig .config; pass config=")
        state_dict = source.state_dict()
    elif isinstance(source, Mapping):
        if config is None:
            raise TypeError("saving a bare state dict needs config=")
        state_dict = dict(source)
    else:
        raise TypeError(f"expected a model, a Checkpoint or a state dict, got {type(source).__name__}")
    state_dict = strip_prefixes(dict(state_dict), [])
    check_state_dict(state_dict, config)
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, config
