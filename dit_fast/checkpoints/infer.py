"""Config inference for weights that store no config (official ``.pt``, bare safetensors), and the key checks.

The tensors give depth (``blocks.{i}``), hidden size, patch size and in_channels (``x_embedder.proj.weight``),
mlp_ratio (``mlp.fc1``), learn_sigma (the final linear's p*p*out rows: out = 2 * in_channels means learned sigma),
input_size (``pos_embed`` tokens: a square grid unless ``input_size`` is given). The rest:

- ``num_heads`` is invisible in the shapes. In order: the ``num_heads`` argument, the ``model_name`` argument,
  train.py's ``args.model``, the one zoo config (``dit_fast.models.config.CONFIGS``) with the same (depth, hidden,
  patch); otherwise a :class:`CheckpointError` asks for ``num_heads``.
- Label table rows R: by default R - 1 classes plus the null class (class dropout 0.1, the official setting; so
  1001 rows = 1000 ImageNet classes). With ``num_classes`` given (argument or ``args.num_classes``): R = num_classes
  + 1 means dropout (0.1 unless ``class_dropout_prob`` is given), R = num_classes means no null row (dropout 0).
  With ``class_dropout_prob=0`` and no ``num_classes``: R classes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from dit_fast.checkpoints.format import CheckpointError
from dit_fast.models.config import CONFIGS, DiTConfig, get_config
from dit_fast.reference import DiT


@dataclass(frozen=True)
class Hints:
    """The caller's overrides; ``None`` means "not given"."""

    numerics: str | None = None
    model_name: str | None = None
    num_heads: int | None = None
    input_size: int | tuple[int, int] | None = None
    num_classes: int | None = None
    class_dropout_prob: float | None = None


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
    _check_official_layout(state_dict)
    hidden, in_channels, patch = _patch_embedding(state_dict)
    depth = _depth(state_dict)
    mlp_hidden = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    learn_sigma = _learn_sigma(state_dict, in_channels, patch)
    input_size = _input_size(int(state_dict["pos_embed"].shape[-2]), patch, input_size)
    rows = int(state_dict["y_embedder.embedding_table.weight"].shape[0])
    num_classes, class_dropout_prob, rule = _classes_from_rows(rows, num_classes, class_dropout_prob)
    num_heads, heads_note = _heads(depth, hidden, patch, model_name, num_heads)
    try:
        config = DiTConfig(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                           numerics=numerics)
    except ValueError as e:
        raise CheckpointError(f"the inferred config is invalid: {e}") from e
    if config.mlp_hidden != mlp_hidden:
        raise CheckpointError(f"mlp hidden size {mlp_hidden} is not representable as int({hidden} * mlp_ratio)")
    return config, [rule, heads_note]


def _check_official_layout(state_dict: Mapping[str, torch.Tensor]) -> None:
    """CheckpointError unless the keys config inference reads are there (with a hint for diffusers keys)."""
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


def _patch_embedding(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(hidden size, in_channels, patch size) from the patch embedding's (D, C, p, p) weight."""
    proj = state_dict["x_embedder.proj.weight"]
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"x_embedder.proj.weight has shape {tuple(proj.shape)}, expected (hidden, C, p, p)")
    hidden, in_channels, patch = (int(s) for s in proj.shape[:3])
    return hidden, in_channels, patch


def _depth(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The number of blocks, which must be numbered 0..depth-1."""
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1
    if block_ids != set(range(depth)):
        raise CheckpointError(f"blocks are not numbered 0..{depth - 1}: missing blocks "
                              f"{sorted(set(range(depth)) - block_ids)}")
    return depth


def _learn_sigma(state_dict: Mapping[str, torch.Tensor], in_channels: int, patch: int) -> bool:
    """Whether the final linear's p*p*out rows hold a learned variance (out = 2 * in_channels)."""
    out = int(state_dict["final_layer.linear.weight"].shape[0])
    if out % (patch * patch) or out // (patch * patch) not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final_layer.linear has {out} outputs; expected patch^2 * {in_channels} or "
                              f"patch^2 * {2 * in_channels} (learned sigma) with patch {patch}")
    return out // (patch * patch) == 2 * in_channels


def _input_size(tokens: int, patch: int, input_size: int | tuple[int, int] | None) -> int | tuple[int, int]:
    """The latent input size: a square grid of ``tokens`` patches, or the given size checked against them."""
    if input_size is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid: pass input_size=(height, width) "
                                  f"(latent size, a multiple of patch {patch})")
        return side * patch
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    if h % patch or w % patch or (h // patch) * (w // patch) != tokens:
        raise CheckpointError(f"input_size {input_size} with patch {patch} gives {(h // patch) * (w // patch)} "
                              f"tokens, but pos_embed has {tokens}")
    return input_size


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


def zoo_name(name: str) -> str | None:
    try:
        get_config(name)
    except ValueError:
        return None
    return name


def reconcile(config: DiTConfig, hints: Hints, where: str, notes: list[str]) -> DiTConfig:
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
    check_keys(state_dict, expected_shapes(config), f"{source} does not fit {describe_config(config)}")


def check_keys(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str) -> None:
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


def describe_config(config: DiTConfig) -> str:
    c = config
    return (f"a DiT with depth {c.depth}, hidden {c.hidden_size}, patch {c.patch_size}, input {c.input_size}, "
            f"in_channels {c.in_channels}, {c.num_classes} classes (dropout {c.class_dropout_prob}), "
            f"learn_sigma {c.learn_sigma}, mlp_ratio {c.mlp_ratio}")


def _natural_sorted(keys: Iterable[str]) -> list[str]:
    """Sort keys with numeric parts compared as numbers (blocks.2 before blocks.10)."""
    return sorted(keys, key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split(".")])
