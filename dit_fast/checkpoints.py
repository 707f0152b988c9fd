"""Checkpoints: official .pt files, train.py dicts, the dit-fast format and diffusers folders, converted both ways.

Where to get weights (dit-fast never downloads anything; fetch the files yourself, then pass a local path):

- Official DiT-XL/2 (facebookresearch/DiT), bare EMA state dicts:
  ``https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt`` and
  ``https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt``.
- The same weights as Hugging Face diffusers pipelines: ``facebook/DiT-XL-2-256`` and ``facebook/DiT-XL-2-512``
  (``huggingface-cli download facebook/DiT-XL-2-256 --local-dir DiT-XL-2-256``); the ``DiTTransformer2DModel`` is
  in the pipeline's ``transformer/`` subfolder.
- The VAE the latents come from: ``stabilityai/sd-vae-ft-ema`` or ``stabilityai/sd-vae-ft-mse``.

One entry point, :func:`load_checkpoint` (or :func:`read_checkpoint` for the weights without building a model),
sniffs the format from the content:

- an official bare state dict (``DiT-XL-2-256x256.pt``) or a safetensors file holding one;
- a train.py checkpoint ``{"model", "ema", "opt", "args"}``: the ``ema`` weights by default, ``model`` with
  ``use_model_weights=True``; ``args`` (an ``argparse.Namespace``) supplies the model name, image size and classes;
- the dit-fast format (below);
- a diffusers ``DiTTransformer2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or
  sharded safetensors, or ``.bin``), or a diffusers pipeline folder with that model in ``transformer/``.

Every ``.pt`` file is read with ``torch.load(..., map_location="cpu", weights_only=True)``; ``argparse.Namespace``
is the one extra class allowed (train.py's ``args``), within a ``torch.serialization.safe_globals`` block. Any other
pickled class makes the load fail with a :class:`CheckpointError` naming it: it is refused for safety, never retried
with ``weights_only=False``.

The dit-fast format (``FORMAT_VERSION`` 1), written by :func:`save_checkpoint`, is a folder::

    model/
      config.json         {"format": "dit-fast", "format_version": 1, "config": DiTConfig.to_dict(), ...}
      model.safetensors   weights under the official state-dict keys (``pos_embed`` included); its safetensors
                          metadata repeats the config ("dit_fast.config") and the format version

or, when the path ends in ``.safetensors``, that one self-describing file alone. Each file is written atomically
(``dit_fast.files.atomic_write``: a temporary file in the same folder, then renamed), weights first: an interrupted
save leaves the previous files intact, or new weights whose embedded config disagrees with the old ``config.json``,
which loading reports.

Config inference for files that do not store a config (official ``.pt``, bare safetensors); the tensors give
depth (``blocks.{i}``), hidden size, patch size and in_channels (``x_embedder.proj.weight``), mlp_ratio
(``mlp.fc1``), learn_sigma (the final linear's p*p*out rows: out = 2 * in_channels means learned sigma),
input_size (``pos_embed`` tokens: a square grid unless ``input_size`` is given). The rest:

- ``num_heads`` is invisible in the shapes. In order: the ``num_heads`` argument, the ``model_name`` argument,
  train.py's ``args.model``, the one zoo config (``dit_fast.config.CONFIGS``) with the same (depth, hidden, patch);
  otherwise a :class:`CheckpointError` asks for ``num_heads``.
- Label table rows R: by default R - 1 classes plus the null class (class dropout 0.1, the official setting; so
  1001 rows = 1000 ImageNet classes). With ``num_classes`` given (argument or ``args.num_classes``): R = num_classes
  + 1 means dropout (0.1 unless ``class_dropout_prob`` is given), R = num_classes means no null row (dropout 0).
  With ``class_dropout_prob=0`` and no ``num_classes``: R classes.

Numerics: a model loaded from official, train.py or diffusers weights follows the official numerics unless
``numerics="diffusers"`` is passed (diffusers' timestep divisor 127 and MLP-norm eps 1e-5, which reproduce
diffusers' own forward); a dit-fast checkpoint follows the numerics it stores unless overridden.
:class:`LoadResult` ``.numerics`` says which, and the loader logs it.

diffusers' key layout: it copies the timestep and label embedders into every block
(``transformer_blocks.{i}.norm1.emb``), splits qkv into ``attn1.to_q/to_k/to_v``, names the final adaLN
``proj_out_1`` and the final linear ``proj_out_2``, and does not store ``pos_embed`` (it recomputes the same sin-cos
table). Converting from diffusers checks that the per-block embedder copies are identical. diffusers is not needed
to convert.

Command line: ``dit-fast convert SRC DST --to {dit-fast,official,diffusers}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from dit_fast import __version__
from dit_fast.config import CONFIGS, NUMERICS, DiTConfig, get_config
from dit_fast.files import atomic_write
from dit_fast.reference import DiT, sincos_pos_embed_2d
from dit_fast.validation import check_output_dir, check_output_file, positive_int

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_BIN_NAME = "diffusion_pytorch_model.bin"
# DiTTransformer2DModel exists since diffusers 0.28; older hub configs name the class Transformer2DModel, which
# diffusers remaps to DiTTransformer2DModel when norm_type is "ada_norm_zero".
DIFFUSERS_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
DIFFUSERS_VERSION = "0.30.0"
DIFFUSERS_NORM_EPS = 1e-5
DIFFUSERS_CLASS_DROPOUT = 0.1  # hard-coded in diffusers' CombinedTimestepLabelEmbeddings
FORMATS = ("dit-fast", "official", "diffusers")
EMBEDDER_MISMATCH = ("error", "warn")

DOWNLOAD_HINT = (
    "dit-fast never downloads weights; get them first:\n"
    "  official DiT-XL/2: https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt and "
    "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt\n"
    "  diffusers pipelines: huggingface-cli download facebook/DiT-XL-2-256 (or facebook/DiT-XL-2-512) "
    "--local-dir DIR, then pass DIR (the transformer is in DIR/transformer)\n"
    "  VAE: stabilityai/sd-vae-ft-ema or stabilityai/sd-vae-ft-mse"
)

# Official key -> key inside diffusers' ``transformer_blocks.{i}.norm1.emb.`` (copied into every block).
_EMBEDDER_KEYS = {
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}
# Official key -> diffusers key, outside the blocks.
_GLOBAL_KEYS = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
# ``blocks.{i}.<official>`` -> ``transformer_blocks.{i}.<diffusers>``; attn.qkv is split into to_q/to_k/to_v.
_BLOCK_KEYS = {
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight",
    "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight",
    "mlp.fc2.bias": "ff.net.2.bias",
}
_QKV = ("to_q", "to_k", "to_v")

StateDict = dict[str, torch.Tensor]
ModelBuilder = Callable[[DiTConfig], nn.Module]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit a DiT; the message says what is wrong and what to do."""


@dataclass
class Checkpoint:
    """Weights in the official key layout and the config they belong to; no model is built.

    ``format`` is where they came from: "official" (bare .pt state dict), "train.py", "safetensors" (a bare state
    dict in a safetensors file), "dit-fast" or "diffusers". ``notes`` records every decision the reader took (how
    the config was found, which weights were taken, what was regenerated). ``objective`` is the training objective
    the file stores (``{"name": "ddpm" | "flow", ...settings}``, from ``dit-fast train``), or {} when it stores none
    (official ``.pt`` files, DiT's and SiT's alike).
    """

    state_dict: StateDict
    config: DiTConfig
    format: str
    source: Path
    notes: list[str] = field(default_factory=list)
    objective: dict[str, Any] = field(default_factory=dict)

    @property
    def numerics(self) -> str:
        return self.config.numerics


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` returns: the model (eval mode) and how it was obtained.

    ``numerics`` is the numerics the model follows: "official" or "diffusers" (see ``DiTConfig``); ``objective``
    the stored training objective ({} when the file stores none).
    """

    model: nn.Module
    config: DiTConfig
    format: str
    source: Path
    notes: list[str] = field(default_factory=list)
    objective: dict[str, Any] = field(default_factory=dict)

    @property
    def numerics(self) -> str:
        return self.config.numerics

    def summary(self) -> str:
        """One line per fact: source, format, config, numerics, then the reader's notes."""
        return _summary(self.source, self.format, self.config, self.notes)


def _summary(source: Path, fmt: str, config: DiTConfig, notes: list[str]) -> str:
    c = config
    lines = [
        f"source: {source} (format: {fmt})",
        f"config: depth {c.depth}, hidden {c.hidden_size}, heads {c.num_heads}, patch {c.patch_size}, "
        f"input {c.input_size}, in_channels {c.in_channels}, classes {c.num_classes} "
        f"(dropout {c.class_dropout_prob}), learn_sigma {c.learn_sigma}, mlp_ratio {c.mlp_ratio}",
        f"numerics: {c.numerics}",
    ]
    return "\n".join(lines + [f"note: {n}" for n in notes])


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model_cls: type[nn.Module] | ModelBuilder | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **read_options: Any,
) -> LoadResult:
    """Load any supported checkpoint into a model (in eval mode), strictly.

    ``model_cls`` builds the model from the config: a class with the official constructor (``DiT``, ``DiTFast``;
    called with the config's fields and ``numerics=``), or any callable ``config -> module`` (e.g.
    ``DiTFast.from_config`` or a ``functools.partial`` with extra options). Default: the reference ``DiT``.
    ``read_options`` are those of :func:`read_checkpoint` (``numerics``, ``model_name``, ``num_heads``,
    ``input_size``, ``num_classes``, ``class_dropout_prob``, ``use_model_weights``, ``embedder_mismatch``).
    The result's ``.numerics`` (also logged) says which numerics the model follows.
    """
    ckpt = read_checkpoint(path, **read_options)
    model = build_model(ckpt, model_cls)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    result = LoadResult(model=model, config=ckpt.config, format=ckpt.format, source=ckpt.source, notes=ckpt.notes,
                        objective=ckpt.objective)
    logger.info("loaded %s (%s): %s numerics", ckpt.source, ckpt.format, ckpt.numerics)
    return result


def build_model(checkpoint: Checkpoint, model_cls: type[nn.Module] | ModelBuilder | None = None) -> nn.Module:
    """Build ``model_cls`` for ``checkpoint.config`` and load its weights with ``strict=True``; eval mode.

    The model is built on the meta device and then takes the checkpoint's tensors (cast to the model's own
    dtypes, as a copying load would), so no time or memory goes into a random init that is overwritten (about
    20 s for DiT-XL/2 on 2 CPU cores). The model's parameters therefore share storage with
    ``checkpoint.state_dict``. A model whose state is not all in its state dict (non-persistent buffers) is
    built normally instead.
    """
    with torch.device("meta"):
        model = _construct(model_cls, checkpoint.config)
    own = model.state_dict()
    state_dict = {k: v.to(own[k].dtype) if k in own else v for k, v in checkpoint.state_dict.items()}
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
    embedder_mismatch: str = "error",
) -> Checkpoint:
    """Read any supported checkpoint into official-layout weights plus a config, checked against each other.

    Overrides (``model_name``, ``num_heads``, ``input_size``, ``num_classes``, ``class_dropout_prob``) fill in what
    the file cannot say (see the module docstring); for formats that store a config they must agree with it.
    ``numerics`` ("official" | "diffusers") overrides the numerics. ``use_model_weights`` takes a train.py
    checkpoint's ``model`` weights instead of ``ema``. ``embedder_mismatch`` ("error" | "warn") is what to do when a
    diffusers model's per-block embedder copies differ ("warn" keeps block 0's, which diffusers' final layer uses).
    """
    if numerics is not None and numerics not in NUMERICS:
        raise ValueError(f"numerics={numerics!r} must be one of {NUMERICS}")
    if embedder_mismatch not in EMBEDDER_MISMATCH:
        raise ValueError(f"embedder_mismatch={embedder_mismatch!r} must be one of {EMBEDDER_MISMATCH}")
    if model_name is not None:
        get_config(model_name)  # an unknown name fails here, listing the valid ones
    hints = _Hints(numerics, model_name, num_heads, input_size, num_classes, class_dropout_prob)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}\n{DOWNLOAD_HINT}")
    if p.is_dir():
        return _read_folder(p, hints, use_model_weights, embedder_mismatch)
    return _read_file(p, hints, use_model_weights, embedder_mismatch)


@dataclass(frozen=True)
class _Hints:
    """The caller's overrides; ``None`` means "not given"."""

    numerics: str | None = None
    model_name: str | None = None
    num_heads: int | None = None
    input_size: int | tuple[int, int] | None = None
    num_classes: int | None = None
    class_dropout_prob: float | None = None


def _read_folder(folder: Path, hints: _Hints, use_model_weights: bool, embedder_mismatch: str) -> Checkpoint:
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


def _read_file(path: Path, hints: _Hints, use_model_weights: bool, embedder_mismatch: str) -> Checkpoint:
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
    """``torch.load`` with ``weights_only=True``, allowing ``argparse.Namespace`` (train.py's ``args``) only."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
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


def check_finite_weights(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the tensors of ``tensors`` that hold NaN or infinity (floating-point tensors only)."""
    bad = [f"{name} ({int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf)"
           for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise CheckpointError(f"{source} holds non-finite weights: {', '.join(bad[:3])}{more}; the model would "
                              "produce NaN (a diverged or damaged checkpoint)")


def _from_torch_object(obj: Any, path: Path, hints: _Hints, use_model_weights: bool) -> Checkpoint:
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
    state_dict = _strip_prefixes(state_dict, notes)
    if stored_config is not None:
        config = _reconcile(DiTConfig.from_dict(dict(stored_config)), hints, f"{path} (its 'config' entry)", notes)
    else:
        config = _infer_with_args(state_dict, hints, args, path, notes)
    check_state_dict(state_dict, config, source=str(path))
    objective = obj.get("objective") if fmt == "train.py" else None
    return Checkpoint(state_dict, config, fmt, path, notes, dict(objective) if isinstance(objective, Mapping) else {})


def _infer_with_args(state_dict: StateDict, hints: _Hints, args: Any, path: Path, notes: list[str]) -> DiTConfig:
    """Infer the config, with train.py's ``args`` (model, image_size, num_classes) filling what hints leave."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    model_name, input_size, num_classes = hints.model_name, hints.input_size, hints.num_classes
    if isinstance(args, Mapping):
        name = args.get("model")
        if model_name is None and isinstance(name, str):
            if _zoo_name(name) is not None:
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


def _read_dit_fast(weights: Path, meta: dict[str, Any] | None, config_path: Path | None, hints: _Hints) -> Checkpoint:
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
        state_dict = _strip_prefixes(state_dict, notes)
        config = _infer_with_args(state_dict, hints, None, weights, notes)
    else:
        distinct = {json.dumps(c.to_dict(), sort_keys=True) for c in configs.values()}
        if len(distinct) > 1:
            raise CheckpointError(
                "the dit-fast config and the weights disagree (an interrupted save?): "
                + "; ".join(f"{where}: {c.to_dict()}" for where, c in configs.items())
            )
        fmt, source = "dit-fast", weights.parent if meta is not None else weights
        config = _reconcile(next(iter(configs.values())), hints, str(source), notes)
        if hints.numerics is None:
            notes.append(f"numerics: {config.numerics} (stored in the checkpoint)")
    check_state_dict(state_dict, config, source=str(weights))
    objective = json.loads(file_meta["dit_fast.objective"]) if "dit_fast.objective" in file_meta else {}
    return Checkpoint(state_dict, config, fmt, source, notes, objective)


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


def _read_diffusers(folder: Path, meta: dict[str, Any], hints: _Hints, embedder_mismatch: str) -> Checkpoint:
    notes: list[str] = []
    config = config_from_diffusers(meta, numerics=hints.numerics or "official", source=str(folder / CONFIG_NAME))
    config = _reconcile(config, dataclasses.replace(hints, numerics=None), str(folder / CONFIG_NAME), notes)
    notes.append(f"class_dropout_prob {config.class_dropout_prob} (diffusers' fixed value; training only)")
    if hints.numerics is None:
        notes.append("numerics: official (the default; pass numerics='diffusers' to reproduce diffusers' own forward: "
                     "timestep divisor 127, MLP-norm eps 1e-5)")
    diffusers_sd = _read_diffusers_weights(folder)
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


def _strip_prefixes(state_dict: StateDict, notes: list[str]) -> StateDict:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
            notes.append(f"stripped the {prefix!r} prefix from every key")
    return state_dict


# ----------------------------------------------------------------------------------------------------------------
# Config inference and checks
# ----------------------------------------------------------------------------------------------------------------


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    model_name: str | None = None,
    num_heads: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    class_dropout_prob: float | None = None,
    numerics: str = "official",
) -> tuple[DiTConfig, list[str]]:
    """The ``DiTConfig`` of an official-layout state dict, from its shapes plus the given hints.

    Returns (config, notes saying where each non-obvious field came from). The rules are in the module
    docstring; anything that cannot be decided raises a :class:`CheckpointError` that says which argument to pass.
    """
    required = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        hint = ("; these are diffusers keys: pass the diffusers folder (config.json + weights) instead"
                if any(k.startswith("transformer_blocks.") for k in state_dict) else "")
        raise CheckpointError(
            f"not a DiT state dict in the official layout: missing {missing}; it has {len(state_dict)} keys, e.g. "
            f"{_natural_sorted(state_dict)[:8]}{hint}"
        )
    notes: list[str] = []
    proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"x_embedder.proj.weight has shape {tuple(proj.shape)}, expected (hidden, C, p, p)")
    hidden, in_channels, patch = (int(s) for s in proj.shape[:3])
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1
    if block_ids != set(range(depth)):
        raise CheckpointError(f"blocks are not numbered 0..{depth - 1}: missing blocks "
                              f"{sorted(set(range(depth)) - block_ids)}")
    mlp_hidden = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    mlp_ratio = mlp_hidden / hidden
    out = int(state_dict["final_layer.linear.weight"].shape[0])
    if out % (patch * patch) or out // (patch * patch) not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final_layer.linear has {out} outputs; expected patch^2 * {in_channels} or "
                              f"patch^2 * {2 * in_channels} (learned sigma) with patch {patch}")
    learn_sigma = out // (patch * patch) == 2 * in_channels

    tokens = int(state_dict["pos_embed"].shape[-2])
    if input_size is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid: pass input_size=(height, width) "
                                  f"(latent size, a multiple of patch {patch})")
        input_size = side * patch
    else:
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        if h % patch or w % patch or (h // patch) * (w // patch) != tokens:
            raise CheckpointError(f"input_size {input_size} with patch {patch} gives {(h // patch) * (w // patch)} "
                                  f"tokens, but pos_embed has {tokens}")

    rows = int(state_dict["y_embedder.embedding_table.weight"].shape[0])
    num_classes, class_dropout_prob, rule = _classes_from_rows(rows, num_classes, class_dropout_prob)
    notes.append(rule)

    num_heads, heads_note = _heads(depth, hidden, patch, model_name, num_heads)
    notes.append(heads_note)
    try:
        config = DiTConfig(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                           numerics=numerics)
    except ValueError as e:
        raise CheckpointError(f"the inferred config is invalid: {e}") from e
    if config.mlp_hidden != mlp_hidden:
        raise CheckpointError(f"mlp hidden size {mlp_hidden} is not representable as int({hidden} * mlp_ratio)")
    return config, notes


def _classes_from_rows(rows: int, num_classes: int | None, dropout: float | None) -> tuple[int, float, str]:
    """(num_classes, class_dropout_prob, note) for a label table of ``rows`` rows; see the module docstring."""
    if num_classes is not None:
        if rows == num_classes + 1:
            if dropout == 0:
                raise CheckpointError(f"the label table has {rows} rows = num_classes {num_classes} + a null row, "
                                      "which class_dropout_prob=0 has no use for; drop the override or fix "
                                      "num_classes")
            p = 0.1 if dropout is None else dropout
            return num_classes, p, f"{rows} label rows = {num_classes} classes + the null class (dropout {p})"
        if rows == num_classes:
            if dropout:
                raise CheckpointError(f"the label table has {rows} rows = num_classes, no null row, so "
                                      f"class_dropout_prob must be 0, not {dropout}")
            return num_classes, 0.0, f"{rows} label rows = {num_classes} classes, no null class (dropout 0)"
        raise CheckpointError(f"the label table has {rows} rows, which fits neither num_classes={num_classes} "
                              f"(+1 null row) nor num_classes={rows - 1}")
    if dropout == 0 or rows < 2:
        return rows, 0.0, f"{rows} label rows = {rows} classes, no null class (dropout 0)"
    p = 0.1 if dropout is None else dropout
    return rows - 1, p, (f"{rows} label rows read as {rows - 1} classes + the null class (dropout {p}; pass "
                         f"num_classes={rows} with class_dropout_prob=0 if the table has no null row)")


def _heads(depth: int, hidden: int, patch: int, model_name: str | None, num_heads: int | None) -> tuple[int, str]:
    if model_name is not None:
        zoo = get_config(model_name)
        if (zoo.depth, zoo.hidden_size, zoo.patch_size) != (depth, hidden, patch):
            raise CheckpointError(
                f"model name {model_name!r} means depth {zoo.depth}, hidden {zoo.hidden_size}, patch {zoo.patch_size}, "
                f"but the weights have depth {depth}, hidden {hidden}, patch {patch}"
            )
    if num_heads is not None:
        return num_heads, f"num_heads {num_heads} as given"
    if model_name is not None:
        return get_config(model_name).num_heads, f"num_heads {get_config(model_name).num_heads} from {model_name}"
    matches = [name for name, c in CONFIGS.items() if (c.depth, c.hidden_size, c.patch_size) == (depth, hidden, patch)]
    if len(matches) == 1:
        heads = CONFIGS[matches[0]].num_heads
        return heads, f"num_heads {heads} from the zoo config {matches[0]} (same depth, hidden, patch)"
    raise CheckpointError(
        f"cannot infer num_heads: the weights (depth {depth}, hidden {hidden}, patch {patch}) match no zoo config "
        f"and the head count is not visible in tensor shapes; pass num_heads=... (--num-heads) or a model name "
        f"(--model; valid: {', '.join(CONFIGS)})"
    )


def _zoo_name(name: str) -> str | None:
    try:
        get_config(name)
    except ValueError:
        return None
    return name


def _reconcile(config: DiTConfig, hints: _Hints, where: str, notes: list[str]) -> DiTConfig:
    """Apply the caller's hints to a stored config: numerics and class dropout may change, the rest must agree."""
    conflicts = []
    if hints.model_name is not None:
        zoo = get_config(hints.model_name)
        for name in ("depth", "hidden_size", "patch_size", "num_heads"):
            if getattr(zoo, name) != getattr(config, name):
                conflicts.append(f"{hints.model_name} has {name}={getattr(zoo, name)}, the checkpoint "
                                 f"{getattr(config, name)}")
    for name in ("num_heads", "num_classes"):
        value = getattr(hints, name)
        if value is not None and value != getattr(config, name):
            conflicts.append(f"{name}={value} but the checkpoint has {getattr(config, name)}")
    if hints.input_size is not None:
        given = (hints.input_size,) * 2 if isinstance(hints.input_size, int) else tuple(hints.input_size)
        if given != config.grid_input:
            conflicts.append(f"input_size={hints.input_size} but the checkpoint has {config.input_size}")
    if hints.class_dropout_prob is not None:
        if (hints.class_dropout_prob > 0) != (config.class_dropout_prob > 0):
            conflicts.append(f"class_dropout_prob={hints.class_dropout_prob} would change the label table rows "
                             f"(the checkpoint has dropout {config.class_dropout_prob})")
        else:
            config = config.replace(class_dropout_prob=hints.class_dropout_prob)
    if conflicts:
        raise CheckpointError(f"{where} stores its config, and the overrides conflict with it: " + "; ".join(conflicts))
    if hints.numerics is not None and hints.numerics != config.numerics:
        notes.append(f"numerics {hints.numerics} as given (the checkpoint stores {config.numerics})")
        config = config.replace(numerics=hints.numerics)
    return config


def expected_shapes(config: DiTConfig) -> dict[str, torch.Size]:
    """Official-layout key -> shape for ``config`` (the reference model's state dict, built on the meta device)."""
    with torch.device("meta"):
        model = DiT.from_config(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state_dict(state_dict: Mapping[str, torch.Tensor], config: DiTConfig, source: str = "state dict") -> None:
    """Raise a :class:`CheckpointError` listing EVERY missing, unexpected and mis-shaped key for ``config``."""
    _check_keys(state_dict, expected_shapes(config), f"{source} does not fit {_describe_config(config)}")


def _check_keys(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str) -> None:
    missing = _natural_sorted(set(expected) - set(actual))
    unexpected = _natural_sorted(set(actual) - set(expected))
    misshaped = [f"{k}: got {tuple(actual[k].shape)}, expected {tuple(expected[k])}"
                 for k in _natural_sorted(set(actual) & set(expected)) if actual[k].shape != expected[k]]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            parts.append(f"{len(items)} {title}:\n" + "\n".join(f"  {item}" for item in items))
    raise CheckpointError(f"{what}:\n" + "\n".join(parts))


def _describe_config(config: DiTConfig) -> str:
    c = config
    return (f"a DiT with depth {c.depth}, hidden {c.hidden_size}, patch {c.patch_size}, input {c.input_size}, "
            f"in_channels {c.in_channels}, {c.num_classes} classes (dropout {c.class_dropout_prob}), "
            f"learn_sigma {c.learn_sigma}, mlp_ratio {c.mlp_ratio}")


def _natural_sorted(keys: Iterable[str]) -> list[str]:
    """Sort keys with numeric parts compared as numbers (blocks.2 before blocks.10)."""
    return sorted(keys, key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split(".")])


# ----------------------------------------------------------------------------------------------------------------
# diffusers layout
# ----------------------------------------------------------------------------------------------------------------


def to_diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """The ``config.json`` that diffusers' ``DiTTransformer2DModel.from_pretrained`` expects for ``config``.

    diffusers' DiT is square, has mlp_ratio 4 and always a null label row; other configs raise a
    :class:`CheckpointError`. Numerics are not stored: diffusers always runs its own (divisor 127, eps 1e-5).
    """
    h, w = config.grid_input
    problems = []
    if h != w:
        problems.append(f"input_size {config.input_size} is not square (diffusers' DiT has one sample_size)")
    if config.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio {config.mlp_ratio} is not 4 (diffusers' DiT feed-forward is 4x wide)")
    if config.class_dropout_prob <= 0:
        problems.append("class_dropout_prob is 0, so the label table has no null row, which diffusers' DiT always has")
    if problems:
        raise CheckpointError("cannot express this model as a diffusers DiTTransformer2DModel: " + "; ".join(problems))
    return {
        "_class_name": "DiTTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "dropout": 0.0,
        "in_channels": config.in_channels,
        "norm_elementwise_affine": False,
        "norm_eps": DIFFUSERS_NORM_EPS,
        "norm_num_groups": 32,
        "norm_type": "ada_norm_zero",
        "num_attention_heads": config.num_heads,
        "num_embeds_ada_norm": config.num_classes,
        "num_layers": config.depth,
        "out_channels": config.out_channels,
        "patch_size": config.patch_size,
        "sample_size": h,
        "upcast_attention": False,
    }


def config_from_diffusers(meta: Mapping[str, Any], numerics: str = "official",
                          source: str = "diffusers config") -> DiTConfig:
    """The ``DiTConfig`` of a diffusers ``DiTTransformer2DModel`` config.json; a non-DiT model is an error."""
    name = meta.get("_class_name")
    if name not in DIFFUSERS_CLASS_NAMES:
        raise CheckpointError(f"{source} describes a diffusers {name}, not a DiT (expected one of "
                              f"{DIFFUSERS_CLASS_NAMES} with norm_type 'ada_norm_zero')")
    expected = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False, "norm_eps": DIFFUSERS_NORM_EPS}
    problems = [f"{k}={meta.get(k, v if k == 'norm_eps' else None)!r} (DiT needs {v!r})" for k, v in expected.items()
                if meta.get(k, v if k == "norm_eps" else None) != v]
    for k in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "patch_size", "sample_size",
              "num_embeds_ada_norm"):
        if not isinstance(meta.get(k), int) or isinstance(meta.get(k), bool):
            problems.append(f"{k}={meta.get(k)!r} (DiT needs an integer)")
    for k in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):
        if meta.get(k) is not None:
            problems.append(f"{k}={meta[k]!r} (DiT has none)")
    if problems:
        raise CheckpointError(f"{source} is a {name} but not a DiT: " + "; ".join(problems))
    in_channels = meta["in_channels"]
    out_channels = meta.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{source}: out_channels {out_channels} is neither in_channels {in_channels} nor twice "
                              "it (learned sigma)")
    try:
        return DiTConfig(
            input_size=meta["sample_size"], patch_size=meta["patch_size"], in_channels=in_channels,
            hidden_size=meta["num_attention_heads"] * meta["attention_head_dim"], depth=meta["num_layers"],
            num_heads=meta["num_attention_heads"], mlp_ratio=4.0, class_dropout_prob=DIFFUSERS_CLASS_DROPOUT,
            num_classes=meta["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels, numerics=numerics,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> StateDict:
    """Official layout -> diffusers ``DiTTransformer2DModel`` layout (embedders copied into every block).

    ``pos_embed`` is dropped (diffusers recomputes the table). Every output tensor owns its storage, so the result
    can be saved with safetensors.
    """
    out: StateDict = {dk: state_dict[ok] for ok, dk in _GLOBAL_KEYS.items()}
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for ok, dk in _BLOCK_KEYS.items():
            out[dst + dk] = state_dict[src + ok]
        for kind in ("weight", "bias"):
            for name, part in zip(_QKV, state_dict[f"{src}attn.qkv.{kind}"].chunk(3, dim=0), strict=True):
                out[f"{dst}attn1.{name}.{kind}"] = part
        for ok, dk in _EMBEDDER_KEYS.items():
            out[f"{dst}norm1.emb.{dk}"] = state_dict[ok]
    return {k: v.detach().clone() for k, v in out.items()}


def from_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: DiTConfig,
    embedder_mismatch: str = "error",
    source: str = "diffusers state dict",
) -> tuple[StateDict, list[str]]:
    """diffusers layout -> official layout (pos_embed regenerated); returns (state dict, notes).

    Every missing/unexpected/mis-shaped diffusers key is listed in one error. The per-block embedder copies must be
    identical; when they differ ``embedder_mismatch="error"`` raises, naming the blocks, and ``"warn"`` warns and
    keeps block 0's (the copy diffusers' final layer uses).
    """
    expected = {k: v.shape for k, v in to_diffusers_state_dict(_meta_tensors(config), config).items()}
    _check_keys(state_dict, expected, f"{source} does not fit a diffusers DiT with {_describe_config(config)}")
    notes = []
    diverged = _diverged_embedder_blocks(state_dict, config.depth)
    if diverged:
        detail = ", ".join(f"block {i} (max |diff| {d:.3g})" for i, d in diverged)
        message = (f"{source}: the per-block copies of the timestep/label embedders differ from block 0's in "
                   f"{detail}; a DiT has one shared embedder, so this model (fine-tuned in diffusers?) cannot be "
                   "converted exactly")
        if embedder_mismatch == "error":
            raise CheckpointError(message + "; pass embedder_mismatch='warn' (--allow-embedder-mismatch) to keep "
                                            "block 0's copy, the one diffusers' final layer uses")
        warnings.warn(message + "; keeping block 0's copy", stacklevel=2)
        notes.append(f"embedder copies differ in blocks {[i for i, _ in diverged]}; kept block 0's")
    out: StateDict = {ok: state_dict[dk] for ok, dk in _GLOBAL_KEYS.items()}
    for ok, dk in _EMBEDDER_KEYS.items():
        out[ok] = state_dict[f"transformer_blocks.0.norm1.emb.{dk}"]
    for i in range(config.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for ok, dk in _BLOCK_KEYS.items():
            out[dst + ok] = state_dict[src + dk]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([state_dict[f"{src}attn1.{n}.{kind}"] for n in _QKV], dim=0)
    dtype = out["x_embedder.proj.weight"].dtype
    out["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None].to(dtype)  # (1, T, D)
    notes.append("pos_embed regenerated (the fixed sin-cos table; diffusers does not store it)")
    return out, notes


def _diverged_embedder_blocks(state_dict: Mapping[str, torch.Tensor], depth: int) -> list[tuple[int, float]]:
    """(block, max abs difference) for every block whose embedder copy is not bitwise block 0's."""
    diverged = []
    for i in range(1, depth):
        diffs = []
        for dk in _EMBEDDER_KEYS.values():
            a = state_dict[f"transformer_blocks.0.norm1.emb.{dk}"]
            b = state_dict[f"transformer_blocks.{i}.norm1.emb.{dk}"]
            if not torch.equal(a, b):
                diffs.append((a.float() - b.float()).abs().max().item())
        if diffs:
            diverged.append((i, max(diffs)))
    return diverged


def _meta_tensors(config: DiTConfig) -> StateDict:
    return {k: torch.empty(shape, device="meta") for k, shape in expected_shapes(config).items()}


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

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
    state_dict, _ = _weights_and_config(source, config)
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


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, **read_options: Any) -> Checkpoint:
    """Read ``src`` (any supported format; ``read_options`` as :func:`read_checkpoint`) and write it to ``dst`` in
    format ``to``. Returns the checkpoint that was read (its notes say what was decided)."""
    if to not in FORMATS:
        raise ValueError(f"unknown checkpoint format {to!r}; valid formats: {', '.join(FORMATS)}")
    ckpt = read_checkpoint(src, **read_options)
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
    state_dict = _strip_prefixes(dict(state_dict), [])
    check_state_dict(state_dict, config)
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, config


# ----------------------------------------------------------------------------------------------------------------
# dit-fast convert
# ----------------------------------------------------------------------------------------------------------------


def _input_size_arg(text: str) -> int | tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    raise argparse.ArgumentTypeError(f"must be a latent size N or HxW (positive integers), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="official .pt, train.py checkpoint, dit-fast checkpoint, "
                                                   "diffusers model or pipeline folder")
    parser.add_argument("dst", metavar="DST", help="output: a folder (dit-fast, diffusers) or a file "
                                                   "(official .pt; dit-fast if it ends in .safetensors)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--numerics", choices=NUMERICS, default=None,
                        help="numerics stored in a dit-fast output (default: the source's; official for others)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help=f"zoo config name, gives num_heads for official weights: {', '.join(CONFIGS)}")
    parser.add_argument("--num-heads", type=positive_int, default=None,
                        help="attention heads (not visible in shapes)")
    parser.add_argument("--input-size", type=_input_size_arg, default=None, metavar="N|HxW",
                        help="latent size, for non-square pos_embed grids")
    parser.add_argument("--num-classes", type=positive_int, default=None, help="classes, without the null row")
    parser.add_argument("--use-model-weights", action="store_true",
                        help="train.py checkpoints: take 'model' instead of 'ema'")
    parser.add_argument("--allow-embedder-mismatch", action="store_true",
                        help="diffusers input: warn (keep block 0's) instead of failing when per-block embedder "
                             "copies differ")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def main(args: argparse.Namespace) -> int:
    dst, src = Path(args.dst), Path(args.src)
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) if src.is_dir() else (
        src.stat().st_size if src.is_file() else 0)  # about the output's size; a missing SRC is reported below
    if args.to == "official" or (args.to == "dit-fast" and dst.suffix == ".safetensors"):
        check_output_file(dst, "DST", size_bytes=size, example="model.pt" if args.to == "official" else
                          "model.safetensors")
    else:
        check_output_dir(dst, "DST", size_bytes=size)
    ckpt = convert(
        args.src, dst, args.to, numerics=args.numerics, model_name=args.model, num_heads=args.num_heads,
        input_size=args.input_size, num_classes=args.num_classes, use_model_weights=args.use_model_weights,
        embedder_mismatch="warn" if args.allow_embedder_mismatch else "error",
    )
    print(_summary(ckpt.source, ckpt.format, ckpt.config, ckpt.notes))
    print(f"wrote {dst} (format: {args.to})")
    if args.to == "diffusers":
        print("note: diffusers runs its own numerics (timestep divisor 127, MLP-norm eps 1e-5); load the folder with "
              "numerics='diffusers' to reproduce it, or the default official numerics to follow the paper")
    elif args.to == "official":
        print("note: the official format stores no config; loading it infers one (num_heads from the zoo, "
              "--model or --num-heads)")
    return 0
