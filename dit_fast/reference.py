"""The plain-PyTorch DiT: the paper's model, faithful in every detail, and the oracle for every fast path.

State-dict keys are identical to facebookresearch/DiT ``models.py``, so an official checkpoint loads with
``load_state_dict(sd, strict=True)``. No timm: the patch embedding, attention and MLP are written out with the
same parameter names (``x_embedder.proj``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit_fast.diffusion.guidance import guided_forward
from dit_fast.models.checkpointing import run_block
from dit_fast.models.config import CONFIGS, DiTConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D), shift/scale (N, D) -> ``x * (1 + scale) + shift`` per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: t (N,) -> (N, dim) as ``[cos, sin]``.

    Frequencies are ``exp(-ln(max_period) * i / (dim/2 - freq_shift))`` for i in [0, dim/2): ``freq_shift=0`` is the
    official DiT, ``freq_shift=1`` is diffusers' ``Timesteps(downscale_freq_shift=1)``.
    """
    half = dim // 2
    # Built on t's device (no host-to-device copy, so it can run inside CUDA-graph capture).
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))  # (half,)
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position table (MAE style) for a (gh, gw) token grid: -> (gh * gw, dim), float32.

    The first half of each vector encodes the column, the second half the row; each half is ``[sin, cos]`` of
    ``pos / 10000^(k / (dim/4))``. Computed in float64 like the official numpy code, then rounded once.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a hidden size divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")  # (gh, gw) each

    def axis(pos: torch.Tensor) -> torch.Tensor:  # (gh * gw,) -> (gh * gw, dim / 2)
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) tokens with a stride-p convolution (``proj``, as timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Timesteps (N,) -> (N, D): 256 sinusoidal frequencies, then Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels (N,) -> (N, D), with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has an extra row, index ``num_classes``: the null class that dropped labels
    (training) and the unconditional half of guided sampling use.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (bias) and an output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, H, T, hd)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, hd)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning."""

    # Sub-module classes (a subclass swaps in ones with the same parameters, as ``DiT``'s component classes).
    attention_cls: type[nn.Module] = Attention
    mlp_cls: type[nn.Module] = Mlp

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = self.attention_cls(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = self.mlp_cls(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D) tokens, c: (N, D) conditioning
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)

    def forward_from_branches(self, x: torch.Tensor, c: torch.Tensor, *, attn_out: torch.Tensor,
                              mlp_out: torch.Tensor) -> torch.Tensor:
        """``forward`` with the attention and MLP outputs given, (N, T, D) each (step caching, ``dit_fast.cache``):
        only the adaLN gates of c (N, D) and the two gated residuals are computed."""
        _, _, gate_msa, _, _, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * attn_out
        return x + gate_mlp.unsqueeze(1) * mlp_out  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map of each token to its p*p*out patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*out)


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie): the official constructor, forward and forward_with_cfg.

    ``input_size`` is the latent side, or ``(height, width)`` for non-square latents. ``numerics`` ("official" or
    "diffusers") selects the timestep-frequency divisor and MLP-norm eps; ``per_block_conditioning=True`` gives
    each block its own timestep/label embedder, as diffusers' ``DiTTransformer2DModel`` has (see ``DiTConfig``).
    """

    # Component classes. A subclass that computes the same function another way (DiTFast) swaps in its own, with the
    # same constructor arguments and parameters, so the module tree, state dict and seeded init stay identical.
    patch_embed_cls: type[nn.Module] = PatchEmbed
    timestep_embedder_cls: type[nn.Module] = TimestepEmbedder
    block_cls: type[nn.Module] = DiTBlock
    final_layer_cls: type[nn.Module] = FinalLayer

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        numerics: str = "official",
        per_block_conditioning: bool = False,
    ):
        super().__init__()
        self.config = DiTConfig(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, numerics=numerics,
            per_block_conditioning=per_block_conditioning,
        )
        cfg = self.config
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        diffusers = numerics == "diffusers"

        self.x_embedder = self.patch_embed_cls(patch_size, in_channels, hidden_size)
        if per_block_conditioning:  # diffusers' layout: embedder i conditions block i; embedder 0 the final layer too
            self.t_embedder = nn.ModuleList([self.timestep_embedder_cls(hidden_size, freq_shift=1 if diffusers else 0)
                                             for _ in range(depth)])
            self.y_embedder = nn.ModuleList([LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
                                             for _ in range(depth)])
        else:
            self.t_embedder = self.timestep_embedder_cls(hidden_size, freq_shift=1 if diffusers else 0)
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table; a persistent buffer so it is in the state dict (as in the official checkpoints).
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_tokens, hidden_size), persistent=True)
        self.blocks = nn.ModuleList([
            self.block_cls(hidden_size, num_heads, mlp_ratio, mlp_norm_eps=1e-5 if diffusers else 1e-6)
            for _ in range(depth)
        ])
        self.final_layer = self.final_layer_cls(hidden_size, patch_size, self.out_channels)
        # Activation checkpointing of the blocks: False/"none", True/"full" (recompute each block in the backward)
        # or "selective" (keep GEMM and attention outputs; dit_fast.models.checkpointing).
        self.gradient_checkpointing: bool | str = False
        self.initialize_weights()

    @classmethod
    def from_config(cls, config: DiTConfig, **kwargs: Any) -> DiT:
        """Build from a ``DiTConfig`` (the one way every script builds a model); ``kwargs`` are a subclass's
        keyword-only options (``DiTFast.from_config(config, kernels="torch")``)."""
        return cls(**config.to_dict(), **kwargs)

    def initialize_weights(self) -> None:
        """The paper's init: Xavier-uniform linears (zero bias), N(0, 0.02) embeddings, adaLN-Zero."""
        init_dit_weights(self)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*c) tokens, each in (p, p, c) order -> (N, c, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h, w = self.config.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a ValueError/TypeError naming the problem when (x, t, y) do not fit this model."""
        validate_inputs(self.config, x, t, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps in 0..999, y (N,) labels -> (N, out_channels, H, W)."""
        self.check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.conditioning(t, y)  # (N, D), or (depth, N, D) with per-block conditioning
        per_block = c.dim() == 3
        for i, block in enumerate(self.blocks):
            x = run_block(block, self.gradient_checkpointing, x, c[i] if per_block else c)  # (N, T, D)
        x = self.final_layer(x, c[0] if per_block else c)  # (N, T, p*p*out)
        return self.unpatchify(x)  # (N, out, H, W)

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_embedder(t) + y_embedder(y): t (N,), y (N,) -> (N, D), or (depth, N, D) with per-block conditioning
        (one embedder pair per block; in training every block sees the same dropped labels)."""
        if not self.config.per_block_conditioning:
            return self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        drop = label_drop_ids(y, self.config.class_dropout_prob, self.training)
        return torch.stack([te(t) + ye(y, self.training, drop) for te, ye in zip(self.t_embedder, self.y_embedder,
                                                                                 strict=True)])  # (depth, N, D)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int | str = 3, interval: tuple[float, float] | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batched forward, with the official semantics.

        The batch is ``[cond; uncond]``: the first half of ``x`` is used for both halves (y holds the real labels,
        then the null class). ``guide_channels=3`` (default) guides output channels 0..2 as the official code
        does for exact FID reproduction; ``"all"`` guides every eps channel. Channels beyond (the learned
        variance) are never guided, and never more than ``in_channels`` channels are. ``interval=(lo, hi)``
        guides only at original timesteps lo <= t <= hi (the conditional output elsewhere). See
        ``guided_forward``.
        """
        return guided_forward(self.forward, x, t, y, cfg_scale, guide_channels, self.in_channels, interval)


def label_drop_ids(y: torch.Tensor, dropout_prob: float, train: bool) -> torch.Tensor | None:
    """Which labels (N,) classifier-free-guidance training drops (int (N,), 1 = dropped), drawn once for every
    embedder; None outside training or without dropout."""
    if not (train and dropout_prob > 0):
        return None
    return (torch.rand(y.shape[0], device=y.device) < dropout_prob).long()


def init_dit_weights(model: nn.Module) -> None:
    """The paper's init, for any module with the DiT layout (``x_embedder.proj``, ``t_embedder.mlp``,
    ``y_embedder``, ``blocks[i].adaLN_modulation``, ``final_layer``, ``pos_embed``, ``config``): Xavier-uniform
    linears with zero bias, the patch conv like a linear, N(0, 0.02) embeddings, adaLN-Zero, fixed sin-cos positions.
    Per-block embedders are initialised one after the other, as the shared pair.
    """

    def basic_init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(basic_init)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed_2d(model.pos_embed.shape[-1], model.config.grid_size)[None])
    # Patch conv initialised like a linear layer over its flattened (C * p * p) inputs.
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    per_block = model.config.per_block_conditioning
    for t_embedder, y_embedder in zip(model.t_embedder if per_block else [model.t_embedder],
                                      model.y_embedder if per_block else [model.y_embedder], strict=True):
        nn.init.normal_(y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)
    # adaLN-Zero: every block starts as the identity, the output starts at zero.
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def validate_inputs(config: DiTConfig, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """Shape, dtype and range checks shared by every DiT implementation.

    The label range is checked here only for labels in host memory: reading device labels would synchronise the GPU
    at every forward (every sampling step). Device labels are range-checked once per batch, on the host, by the code
    that holds them there (``generate``, the trainer, the diffusers pipeline's label mapping); nothing is checked while
    compiling."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4D tensor (N, C, H, W), got {_describe(x)}")
    n, c, h, w = x.shape
    if c != config.in_channels:
        raise ValueError(f"x has {c} channels, the model expects in_channels={config.in_channels}")
    if (h, w) != config.grid_input:
        hint = (f"; {h}x{w} is not a multiple of patch size {config.patch_size}"
                if h % config.patch_size or w % config.patch_size else "")
        raise ValueError(f"x is {h}x{w}, the model was built for input_size {config.grid_input}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not isinstance(t, torch.Tensor) or t.shape != (n,):
        raise ValueError(f"t must have shape ({n},) (one timestep per sample), got {_describe(t)}")
    if not isinstance(y, torch.Tensor) or y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) (one class label per sample), got {_describe(y)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")
    if y.device.type == "cpu" and not torch.compiler.is_compiling():
        check_labels(y, config.num_classes, null_class=config.class_dropout_prob > 0)


def check_labels(labels: torch.Tensor, num_classes: int, *, null_class: bool = False, what: str = "labels") -> None:
    """ValueError naming the offending ids unless every label (N,) is in [0, num_classes - 1], or in
    [0, num_classes] with ``null_class`` (index ``num_classes`` is the classifier-free guidance null class)."""
    top = num_classes if null_class else num_classes - 1
    if labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) <= top):
        return
    bad = sorted(set(labels[(labels < 0) | (labels > top)].tolist()))
    null = f" (index {num_classes} is the null class)" if null_class else ""
    raise ValueError(f"{what} must be in [0, {top}]{null}; {what} {bad[:10]}{' ...' if len(bad) > 10 else ''} "
                     f"are out of range (min {int(labels.min())}, max {int(labels.max())})")


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)} and dtype {v.dtype}"
    return f"{type(v).__name__}"










def model_constructors(cls: type[nn.Module]) -> dict[str, Callable[..., Any]]:
    """``{"DiT-S/8": build, ...}`` where ``build(**kwargs)`` makes a ``cls`` with that config's depth, width, heads
    and patch (as the official ``DiT_XL_2(**kwargs)`` functions); kwargs override or add constructor arguments."""

    def constructor(name: str) -> Callable[..., Any]:
        cfg = CONFIGS[name]

        def build(**kwargs: Any) -> Any:
            args = {"depth": cfg.depth, "hidden_size": cfg.hidden_size, "patch_size": cfg.patch_size,
                    "num_heads": cfg.num_heads}
            args.update(kwargs)
            return cls(**args)

        build.__name__ = name.replace("-", "_").replace("/", "_")
        build.__doc__ = (f"{name} as {cls.__name__}: depth {cfg.depth}, hidden {cfg.hidden_size}, "
                         f"{cfg.num_heads} heads, patch {cfg.patch_size}.")
        return build

    return {name: constructor(name) for name in CONFIGS}


DiT_models: dict[str, Callable[..., DiT]] = model_constructors(DiT)
