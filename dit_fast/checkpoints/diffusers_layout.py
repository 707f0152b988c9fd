"""diffusers' ``DiTTransformer2DModel`` key layout and config, to and from the official layout.

diffusers copies the timestep and label embedders into every block (``transformer_blocks.{i}.norm1.emb``), splits
qkv into ``attn1.to_q/to_k/to_v``, names the final adaLN ``proj_out_1`` and the final linear ``proj_out_2``, and
does not store ``pos_embed`` (it recomputes the same sin-cos table). Identical per-block embedder copies (every
released checkpoint) convert to the shared pair; copies that differ (a DiT built or trained in diffusers) convert
exactly to a per-block-conditioned model (``DiTConfig.per_block_conditioning``), embedder i <-> block i's copy.
diffusers itself is not needed to convert.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from dit_fast.checkpoints.format import CheckpointError, StateDict
from dit_fast.checkpoints.infer import check_keys, describe_config, expected_shapes
from dit_fast.models.config import DiTConfig
from dit_fast.reference import sincos_pos_embed_2d

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


DIFFUSERS_BIN_NAME = "diffusion_pytorch_model.bin"


# DiTTransformer2DModel exists since diffusers 0.28; older hub configs name the class Transformer2DModel, which
# diffusers remaps to DiTTransformer2DModel when norm_type is "ada_norm_zero".
DIFFUSERS_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")


DIFFUSERS_VERSION = "0.30.0"


DIFFUSERS_NORM_EPS = 1e-5


DIFFUSERS_CLASS_DROPOUT = 0.1  # hard-coded in diffusers' CombinedTimestepLabelEmbeddings


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
    """Official layout -> diffusers ``DiTTransformer2DModel`` layout: the shared embedders copied into every block,
    or with ``config.per_block_conditioning`` embedder i (``t_embedder.{i}``, ``y_embedder.{i}``) into block i.

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
            out[f"{dst}norm1.emb.{dk}"] = state_dict[_embedder_key(ok, i, config)]
    return {k: v.detach().clone() for k, v in out.items()}


def _embedder_key(official: str, block: int, config: DiTConfig) -> str:
    """``t_embedder.mlp.0.weight`` -> itself (shared), or ``t_embedder.{block}.mlp.0.weight`` (per block)."""
    if not config.per_block_conditioning:
        return official
    module, _, rest = official.partition(".")
    return f"{module}.{block}.{rest}"


def with_diffusers_conditioning(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> DiTConfig:
    """``config`` with the conditioning layout of diffusers weights: shared when every block's embedder copy is
    bitwise block 0's (every released checkpoint), per block when any differs (built or trained in diffusers)."""
    return config.replace(per_block_conditioning=bool(_diverged_embedder_blocks(state_dict, config.depth)))


def from_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: DiTConfig,
    embedder_mismatch: str = "error",
    source: str = "diffusers state dict",
) -> tuple[StateDict, list[str]]:
    """diffusers layout -> official layout (pos_embed regenerated); returns (state dict, notes).

    Every missing/unexpected/mis-shaped diffusers key is listed in one error. With ``config.per_block_conditioning``
    block i's embedder copy becomes embedder i, exactly (``with_diffusers_conditioning`` picks the layout).
    Otherwise the copies must be identical; when they differ ``embedder_mismatch="warn"`` warns and keeps block 0's
    (the copy diffusers' final layer uses), anything else raises, naming the blocks.
    """
    expected = {k: v.shape for k, v in to_diffusers_state_dict(meta_tensors(config), config).items()}
    check_keys(state_dict, expected, f"{source} does not fit a diffusers DiT with {describe_config(config)}")
    notes = ["pos_embed regenerated (the fixed sin-cos table; diffusers does not store it)"]
    diverged = [] if config.per_block_conditioning else _diverged_embedder_blocks(state_dict, config.depth)
    if diverged:
        detail = ", ".join(f"block {i} (max |diff| {d:.3g})" for i, d in diverged)
        message = (f"{source}: the per-block copies of the timestep/label embedders differ from block 0's in "
                   f"{detail}; a DiT has one shared embedder, so this model (fine-tuned in diffusers?) cannot be "
                   "converted exactly")
        if embedder_mismatch != "warn":
            raise CheckpointError(message + "; convert with per_block_conditioning (embedder_mismatch='per-block', "
                                            "the default of read_checkpoint) to keep every copy, or pass "
                                            "embedder_mismatch='warn' (--allow-embedder-mismatch) to keep block 0's")
        warnings.warn(message + "; keeping block 0's copy", stacklevel=2)
        notes.append(f"embedder copies differ in blocks {[i for i, _ in diverged]}; kept block 0's")
    out: StateDict = {ok: state_dict[dk] for ok, dk in _GLOBAL_KEYS.items()}
    for i in range(config.depth if config.per_block_conditioning else 1):  # block 0's copy is the shared pair
        for ok, dk in _EMBEDDER_KEYS.items():
            out[_embedder_key(ok, i, config)] = state_dict[f"transformer_blocks.{i}.norm1.emb.{dk}"]
    for i in range(config.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for ok, dk in _BLOCK_KEYS.items():
            out[dst + ok] = state_dict[src + dk]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([state_dict[f"{src}attn1.{n}.{kind}"] for n in _QKV], dim=0)
    dtype = out["x_embedder.proj.weight"].dtype
    out["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None].to(dtype)  # (1, T, D)
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


def meta_tensors(config: DiTConfig) -> StateDict:
    return {k: torch.empty(shape, device="meta") for k, shape in expected_shapes(config).items()}
