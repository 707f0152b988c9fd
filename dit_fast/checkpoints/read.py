"""Reading checkpoints: one entry point, ``load_checkpoint`` (``read_checkpoint`` without building a model).

The format is sniffed from the content: an official bare state dict (``DiT-XL-2-256x256.pt``) or a safetensors
file holding one; a train.py checkpoint ``{"model", "ema", "opt", "args"}`` (the ``ema`` weights by default,
``model`` with ``use_model_weights=True``; ``args`` supplies the model name, image size and classes); the dit-fast
format (``dit_fast.checkpoints.write``); a diffusers ``DiTTransformer2DModel`` folder or a pipeline folder with one
in ``transformer/``. Every ``.pt`` file is read with ``torch.load(..., weights_only=True)``, ``argparse.Namespace``
(train.py's ``args``) the one extra class allowed; any other pickled class is refused (a ``CheckpointError`` naming
it), never retried with ``weights_only=False``. Files without a config get one from ``dit_fast.checkpoints.infer``.

Numerics: official, train.py or diffusers weights follow the official numerics unless ``numerics="diffusers"``
is passed; a dit-fast checkpoint follows the numerics it stores unless overridden. docs/checkpoints.md has the
formats, where to get weights and how conversion works.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from dit_fast.checkpoints.diffusers_layout import (
    DIFFUSERS_BIN_NAME,
    DIFFUSERS_INDEX_NAME,
    DIFFUSERS_WEIGHTS_NAME,
    config_from_diffusers,
    from_diffusers_state_dict,
    with_diffusers_conditioning,
)
from dit_fast.checkpoints.format import (
    CONFIG_NAME,
    DOWNLOAD_HINT,
    EMBEDDER_MISMATCH,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    Checkpoint,
    CheckpointError,
    StateDict,
)
from dit_fast.checkpoints.infer import Hints, check_state_dict, infer_config, reconcile, zoo_name
from dit_fast.models.config import NUMERICS, DiTConfig, get_config
from dit_fast.reference import DiT

logger = logging.getLogger(__name__)


ModelBuilder = Callable[[DiTConfig], nn.Module]


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model_cls: type[nn.Module] | ModelBuilder | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **read_options: Any,
) -> Checkpoint:
    """Load any supported checkpoint into a model (in eval mode, as ``.model`` of the result), strictly.

    ``model_cls`` builds the model from the config: a class with the official constructor (``DiT``, ``DiTFast``;
    called with the config's fields and ``numerics=``), or any callable ``config -> module`` (e.g.
    ``DiTFast.from_config`` or a ``functools.partial`` with extra options). Default: the reference ``DiT``.
    ``read_options`` are those of :func:`read_checkpoint` (``numerics``, ``model_name``, ``num_heads``,
    ``input_size``, ``num_classes``, ``class_dropout_prob``, ``use_model_weights``, ``embedder_mismatch``).
    The result's ``.numerics`` (also logged) says which numerics the model follows.
    """
    ckpt = read_checkpoint(path, **read_options)
    model = model_from_checkpoint(ckpt, model_cls, dtype=dtype)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    logger.info("loaded %s (%s): %s numerics", ckpt.source, ckpt.format, ckpt.numerics)
    return dataclasses.replace(ckpt, state_dict=model.state_dict(), model=model)


def model_from_checkpoint(checkpoint: Checkpoint, model_cls: type[nn.Module] | ModelBuilder | None = None, *,
                          dtype: torch.dtype | None = None) -> nn.Module:
    """Build ``model_cls`` for ``checkpoint.config`` and load its weights with ``strict=True``; eval mode.

    Built on the meta device, the model takes the checkpoint's tensors (cast to its own dtypes, or floating ones to
    ``dtype``: one cast, none for a file in it), so no random init is overwritten (~20 s for XL/2 on 2 CPU cores)
    and the parameters share storage with ``checkpoint.state_dict``; with non-persistent buffers it is built normally.
    """
    with torch.device("meta"):
        model = _construct(model_cls, checkpoint.config)
    own = model.state_dict()
    state_dict = {k: v.to(dtype if dtype is not None and own[k].is_floating_point() else own[k].dtype)
                  if k in own else v for k, v in checkpoint.state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            model = _construct(model_cls, checkpoint.config)
            model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{type(model).__name__} does not accept the weights of {checkpoint.source}: {e}") from e
    return model.eval()


def _construct(model_cls: type[nn.Module] | ModelBuilder | None, config: DiTConfig) -> nn.Module:
    if model_cls is None or (isinstance(model_cls, type) and issubclass(model_cls, DiT)):
        return (model_cls or DiT).from_config(config)
    if isinstance(model_cls, type):  # another class with the official constructor
        return model_cls(**config.to_dict())
    return model_cls(config)


def read_checkpoint(
    path: str | os.PathLike,
    *,
    numerics: str | None = None,
    model_name: str | None = None,
    num_heads: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    class_dropout_prob: float | None = None,
    use_model_weights: bool = False,
    embedder_mismatch: str = "per-block",
) -> Checkpoint:
    """Read any supported checkpoint into official-layout weights plus a config, checked against each other.

    Overrides (``model_name``, ``num_heads``, ``input_size``, ``num_classes``, ``class_dropout_prob``) fill in what
    the file cannot say (see the module docstring); for formats that store a config they must agree with it.
    ``numerics`` ("official" | "diffusers") overrides the numerics. ``use_model_weights`` takes a train.py
    checkpoint's ``model`` weights instead of ``ema``. ``embedder_mismatch`` is what to do when a diffusers model's
    per-block embedder copies differ: "per-block" (default) converts exactly to a per-block-conditioned model, "warn"
    keeps block 0's copy (the one diffusers' final layer uses; lossy), "error" raises.
    """
    if numerics is not None and numerics not in NUMERICS:
        raise ValueError(f"numerics={numerics!r} must be one of {NUMERICS}")
    if embedder_mismatch not in EMBEDDER_MISMATCH:
        raise ValueError(f"embedder_mismatch={embedder_mismatch!r} must be one of {EMBEDDER_MISMATCH}")
    if model_name is not None:
        get_config(model_name)  # an unknown name fails here, listing the valid ones
    hints = Hints(numerics, model_name, num_heads, input_size, num_classes, class_dropout_prob)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}\n{DOWNLOAD_HINT}")
    if p.is_dir():
        return _read_folder(p, hints, use_model_weights, embedder_mismatch)
    return _read_file(p, hints, use_model_weights, embedder_mismatch)


def _read_folder(folder: Path, hints: Hints, use_model_weights: bool, embedder_mismatch: str) -> Checkpoint:
    _no_model_weights_option(use_model_weights, folder, "a folder")
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        meta = _read_json(config_path)
        if meta.get("format") == "dit-fast":
            return _read_dit_fast(folder / WEIGHTS_NAME, meta, config_path, hints)
        if "_class_name" in meta:
            return _read_diffusers(folder, meta, hints, embedder_mismatch)
        raise CheckpointError(
            f"{config_path} is neither a dit-fast config (\"format\": \"dit-fast\") nor a diffusers model config "
            f"(\"_class_name\"); its keys: {sorted(meta)}"
        )
    if (folder / "transformer" / CONFIG_NAME).is_file():
        ckpt = _read_folder(folder / "transformer", hints, use_model_weights, embedder_mismatch)
        ckpt.notes.insert(0, "diffusers pipeline folder: read its transformer/ subfolder")
        return ckpt
    if (folder / WEIGHTS_NAME).is_file():
        return _read_file(folder / WEIGHTS_NAME, hints, use_model_weights, embedder_mismatch)
    raise CheckpointError(
        f"{folder} is not a checkpoint folder: expected {CONFIG_NAME} + {WEIGHTS_NAME} (dit-fast), "
        f"{CONFIG_NAME} + {DIFFUSERS_WEIGHTS_NAME} (a diffusers DiTTransformer2DModel), or a diffusers pipeline "
        f"with transformer/{CONFIG_NAME}; it holds: {sorted(x.name for x in folder.iterdir())[:20]}"
    )


def _read_file(path: Path, hints: Hints, use_model_weights: bool, embedder_mismatch: str) -> Checkpoint:
    kind = _sniff_file(path)
    if kind == "safetensors":
        _no_model_weights_option(use_model_weights, path, "a safetensors file")
        if path.name == DIFFUSERS_WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
            return _read_folder(path.parent, hints, False, embedder_mismatch)
        return _read_dit_fast(path, None, None, hints)
    obj = _torch_load(path)
    return _from_torch_object(obj, path, hints, use_model_weights)


def _sniff_file(path: Path) -> str:
    """"torch" (zip or legacy pickle) or "safetensors", from the first bytes; anything else is an error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted download?)")
    # safetensors first: its 8-byte little-endian header length may well start with 0x80, like a pickle.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    raise CheckpointError(
        f"{path} is not a checkpoint: neither a PyTorch file (torch.save zip or pickle) nor a safetensors file "
        f"(first bytes {head!r})"
    )


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing ``argparse.Namespace`` (train.py's ``args``) only; zip-format
    files (every ``torch.save`` since 1.6) memory-mapped, privately: read from the page cache, not copied first."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError... for bad files
        raise CheckpointError(describe_load_error(path, e)) from e


# What torch's weights-only unpickler says when it refuses an object (global, call or build), as opposed to a damaged
# stream; the matching group names what was refused.
_REFUSED_PICKLE = re.compile(
    r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+) whose module \S+ is blocked"
    r"|call reduce for unrecognized function (.+?)(?: which belongs|$)|Can only create new object .* but got (.+)$"
    r"|Can only build .* but got (.+)$", re.MULTILINE)


def describe_load_error(path: str | os.PathLike, error: BaseException) -> str:
    """One message for a failed weights-only ``torch.load`` of ``path``: the file holds code objects dit-fast will
    not load (naming them), or it is truncated or corrupt. torch's advice to retry with ``weights_only=False`` is
    left out on purpose."""
    m = _REFUSED_PICKLE.search(str(error))
    if m is not None:
        refused = next(g for g in m.groups() if g is not None)
        return (f"{path} holds code objects ({refused}) that dit-fast will not load: it reads tensors only and never "
                "runs code from a file. If you trust the file, re-save just its tensors where it was written, e.g. "
                "torch.save(ckpt['ema'], 'weights.pt')")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and not line.startswith("Check the documentation")]
    return f"could not read {path}: truncated or corrupt PyTorch file ({type(error).__name__}: {(useful or [''])[0]})"


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: a sum is finite only if every element is (one read; XL/2 in 0.06 s, the mask took 1 s);
    a non-finite sum (such an element, or finite ones overflowing) is settled by the exact elementwise check."""
    accumulate = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return bool(torch.isfinite(t.sum(dtype=accumulate))) or bool(torch.isfinite(t).all())


def check_finite_weights(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the tensors of ``tensors`` that hold NaN or infinity (floating-point tensors only)."""
    bad = [f"{name} ({int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf)"
           for name, t in tensors.items() if t.is_floating_point() and not _all_finite(t)]
    if bad:
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise CheckpointError(f"{source} holds non-finite weights: {', '.join(bad[:3])}{more}; the model would "
                              "produce NaN (a diverged or damaged checkpoint)")


def _from_torch_object(obj: Any, path: Path, hints: Hints, use_model_weights: bool) -> Checkpoint:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a train.py checkpoint dict")
    notes: list[str] = []
    args: Any = None
    stored_config: Any = None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        _no_model_weights_option(use_model_weights, path, "a bare state dict")
        fmt, state_dict = "official", dict(obj)
    elif "ema" in obj or "model" in obj:
        key = "model" if use_model_weights else "ema"
        if key not in obj:
            other = "use_model_weights=False" if use_model_weights else "use_model_weights=True (--use-model-weights)"
            raise CheckpointError(f"train.py checkpoint {path} has no {key!r} entry (it has {sorted(obj)}); "
                                  f"pass {other}")
        state_dict = obj[key]
        if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise CheckpointError(f"{path}: entry {key!r} is not a state dict of tensors")
        fmt, state_dict = "train.py", dict(state_dict)
        notes.append(f"train.py checkpoint: took its {key!r} weights (entries: {sorted(obj)})")
        args, stored_config = obj.get("args"), obj.get("config")
    else:
        raise CheckpointError(
            f"{path} is neither a DiT state dict (tensors under keys like 'x_embedder.proj.weight') nor a train.py "
            f"checkpoint (with 'ema' / 'model'); its top-level keys: {sorted(map(str, obj))[:20]}"
        )
    state_dict = strip_prefixes(state_dict, notes)
    if stored_config is not None:
        config = reconcile(DiTConfig.from_dict(dict(stored_config)), hints, f"{path} (its 'config' entry)", notes)
    else:
        config = _infer_with_args(state_dict, hints, args, path, notes)
    check_state_dict(state_dict, config, source=str(path))
    objective = obj.get("objective") if fmt == "train.py" else None
    return Checkpoint(state_dict, config, fmt, path, notes,
                      objective=dict(objective) if isinstance(objective, Mapping) else {})


def _infer_with_args(state_dict: StateDict, hints: Hints, args: Any, path: Path, notes: list[str]) -> DiTConfig:
    """Infer the config, with train.py's ``args`` (model, image_size, num_classes) filling what hints leave."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    model_name, input_size, num_classes = hints.model_name, hints.input_size, hints.num_classes
    if isinstance(args, Mapping):
        name = args.get("model")
        if model_name is None and isinstance(name, str):
            if zoo_name(name) is not None:
                model_name = name
                notes.append(f"model name {name!r} from the checkpoint's args.model")
            else:
                notes.append(f"args.model {name!r} is not a zoo config; ignored")
        image_size = args.get("image_size")
        if input_size is None and isinstance(image_size, int) and image_size % 8 == 0:
            input_size = image_size // 8
            notes.append(f"input_size {input_size} from args.image_size {image_size} (latent = image / 8)")
        if num_classes is None and isinstance(args.get("num_classes"), int):
            num_classes = args["num_classes"]
            notes.append(f"num_classes {num_classes} from args.num_classes")
    config, inferred = infer_config(
        state_dict, model_name=model_name, num_heads=hints.num_heads, input_size=input_size,
        num_classes=num_classes, class_dropout_prob=hints.class_dropout_prob, numerics=hints.numerics or "official",
    )
    notes.extend(inferred)
    if hints.numerics is None:
        notes.append("numerics: official (the default for weights without a dit-fast config; "
                     "pass numerics='diffusers' to follow diffusers' forward)")
    return config


def _read_dit_fast(weights: Path, meta: dict[str, Any] | None, config_path: Path | None, hints: Hints) -> Checkpoint:
    """A dit-fast folder (``meta`` from its config.json) or a single safetensors file (dit-fast or bare)."""
    if not weights.is_file():
        raise CheckpointError(f"dit-fast checkpoint {weights.parent} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    file_meta, state_dict = _load_safetensors(weights)
    configs = {}
    if meta is not None:
        configs[str(config_path)] = _parse_dit_fast_meta(meta, str(config_path))
    if "dit_fast.config" in file_meta:
        version = file_meta.get("dit_fast.format_version", "?")
        configs[str(weights)] = _parse_dit_fast_meta(
            {"format": "dit-fast", "format_version": int(version) if version.isdigit() else version,
             "config": json.loads(file_meta["dit_fast.config"])}, str(weights))
    notes: list[str] = []
    if not configs:
        fmt, source = "safetensors", weights
        state_dict = strip_prefixes(state_dict, notes)
        config = _infer_with_args(state_dict, hints, None, weights, notes)
    else:
        distinct = {json.dumps(c.to_dict(), sort_keys=True) for c in configs.values()}
        if len(distinct) > 1:
            raise CheckpointError(
                "the dit-fast config and the weights disagree (an interrupted save?): "
                + "; ".join(f"{where}: {c.to_dict()}" for where, c in configs.items())
            )
        fmt, source = "dit-fast", weights.parent if meta is not None else weights
        config = reconcile(next(iter(configs.values())), hints, str(source), notes)
        if hints.numerics is None:
            notes.append(f"numerics: {config.numerics} (stored in the checkpoint)")
    check_state_dict(state_dict, config, source=str(weights))
    objective = json.loads(file_meta["dit_fast.objective"]) if "dit_fast.objective" in file_meta else {}
    return Checkpoint(state_dict, config, fmt, source, notes, objective=objective)


def _parse_dit_fast_meta(meta: dict[str, Any], where: str) -> DiTConfig:
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: dit-fast format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where} was written by a newer dit-fast (format version {version}; this version "
                              f"reads up to {FORMAT_VERSION}): upgrade dit-fast")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{where}: dit-fast metadata has no 'config' object")
    try:
        return DiTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid dit-fast config: {e}") from e


def _read_diffusers(folder: Path, meta: dict[str, Any], hints: Hints, embedder_mismatch: str) -> Checkpoint:
    notes: list[str] = []
    config = config_from_diffusers(meta, numerics=hints.numerics or "official", source=str(folder / CONFIG_NAME))
    config = reconcile(config, dataclasses.replace(hints, numerics=None), str(folder / CONFIG_NAME), notes)
    notes.append(f"class_dropout_prob {config.class_dropout_prob} (diffusers' fixed value; training only)")
    if hints.numerics is None:
        notes.append("numerics: official (the default; pass numerics='diffusers' to reproduce diffusers' own forward: "
                     "timestep divisor 127, MLP-norm eps 1e-5)")
    diffusers_sd = _read_diffusers_weights(folder)
    if embedder_mismatch == "per-block":
        config = with_diffusers_conditioning(diffusers_sd, config)
    state_dict, mapped = from_diffusers_state_dict(diffusers_sd, config, embedder_mismatch=embedder_mismatch,
                                                   source=str(folder))
    notes.extend(mapped)
    check_state_dict(state_dict, config, source=str(folder))
    return Checkpoint(state_dict, config, "diffusers", folder, notes)


def _read_diffusers_weights(folder: Path) -> StateDict:
    if (folder / DIFFUSERS_WEIGHTS_NAME).is_file():
        return _load_safetensors(folder / DIFFUSERS_WEIGHTS_NAME)[1]
    if (folder / DIFFUSERS_INDEX_NAME).is_file():
        weight_map = _read_json(folder / DIFFUSERS_INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / DIFFUSERS_INDEX_NAME} has no 'weight_map'")
        state_dict: StateDict = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(_load_safetensors(folder / shard)[1])
        return state_dict
    if (folder / DIFFUSERS_BIN_NAME).is_file():
        obj = _torch_load(folder / DIFFUSERS_BIN_NAME)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{folder / DIFFUSERS_BIN_NAME} holds a {type(obj).__name__}, not a state dict")
        return dict(obj)
    raise CheckpointError(
        f"diffusers folder {folder} has {CONFIG_NAME} but no weights: expected {DIFFUSERS_WEIGHTS_NAME}, "
        f"{DIFFUSERS_INDEX_NAME} (+ shards) or {DIFFUSERS_BIN_NAME}; it holds "
        f"{sorted(x.name for x in folder.iterdir())}"
    )


def _load_safetensors(path: Path) -> tuple[dict[str, str], StateDict]:
    """(metadata, tensors) of a safetensors file on the CPU; a truncated or corrupt file is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError and OSError: the header or the data is unreadable
        raise CheckpointError(f"could not read {path}: truncated or corrupt safetensors file ({e})") from e
    return metadata, tensors


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"could not read {path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _no_model_weights_option(use_model_weights: bool, path: Path, what: str) -> None:
    if use_model_weights:
        raise CheckpointError(f"use_model_weights applies to train.py checkpoints only; {path} is {what}")


def strip_prefixes(state_dict: StateDict, notes: list[str]) -> StateDict:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
            notes.append(f"stripped the {prefix!r} prefix from every key")
    return state_dict
