"""DiTFast: the reference DiT computed with fused kernels, a pluggable attention backend and fast inference paths.

Same constructor, methods, module tree and state dict as ``dit_fast.reference.DiT`` (the official keys, so an
official checkpoint loads with ``strict=True`` both ways), same init, same function. What differs is how a forward
is computed (D hidden, L blocks):

    tokens = patchify(x) @ W_patch^T + b + pos_embed        # the conv as one GEMM on the conv weight, viewed
    c      = t_mlp(timestep_embedding(t)) + table[y]         # (N, D), fp32
    mods   = silu(c) @ [W_ada_0; ...; W_ada_{L-1}]^T         # every block's adaLN in one GEMM (inference)
    block i:
        x, h = gated_residual_modulated_layer_norm(x, gate_mlp[i-1], mlp_out[i-1], shift_msa[i], scale_msa[i])
        x, h = gated_residual_modulated_layer_norm(x, gate_msa[i], attn(h), shift_mlp[i], scale_mlp[i])
        mlp_out[i] = mlp(h)                                  # its residual is added at the next boundary
    final: _, h = gated_residual_modulated_layer_norm(x, gate_mlp[L-1], mlp_out[L-1], shift, scale)
           out  = unpatchify(h @ W_final^T + b)

so each block boundary is one pass over the residual stream. Backends: ``kernels=`` (``dit_fast.kernels.registry``)
and ``attention=`` (``dit_fast.models.attention``); docs/kernels.md covers precision, bf16 and the linears.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dit_fast import reference
from dit_fast.diffusion.guidance import guided_forward
from dit_fast.kernels.linear import cpu_linear_route
from dit_fast.kernels.registry import KERNELS, KernelOps, require_kernels, resolve_kernels
from dit_fast.models.attention import attention, require_backend
from dit_fast.models.checkpointing import run_block
from dit_fast.reference import DiT, label_drop_ids, model_constructors, timestep_embedding


def _autocasting(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


def _adaln(linear: torch.nn.Linear, silu_c: torch.Tensor) -> torch.Tensor:
    """One adaLN output ``linear(silu(c))``: (N, D) -> (N, k*D); ``silu_c`` goes in as autocast or the weight wants."""
    return linear(silu_c if _autocasting(silu_c.device.type) else silu_c.to(linear.weight.dtype))


class PatchEmbed(reference.PatchEmbed):
    """(N, C, H, W) -> (N, T, D): patchify, then one GEMM with the conv weight viewed as (D, C*p*p) (no copy); keeps
    the official ``proj`` Conv2d, so the state dict and the init are the reference's."""

    def forward(self, x: torch.Tensor, ops: KernelOps, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x (N, C, H, W) -> (N, T, D), computed in ``dtype`` (default: the weight's; autocast's under autocast)."""
        weight = self.proj.weight  # (D, C, p, p)
        patches = ops.patchify(x, self.patch_size)  # (N, T, C*p*p), each vector in (C, p, p) order
        if not _autocasting(x.device.type):
            patches = patches.to(dtype or weight.dtype)
        return ops.linear(patches, weight.flatten(1), self.proj.bias)  # (N, T, D)


class TimestepEmbedder(reference.TimestepEmbedder):
    """Timesteps (N,) -> (N, D) in fp32: 256 sinusoidal frequencies, then Linear, SiLU, Linear (weights upcast)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)  # (N, 256)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        with torch.autocast(t.device.type, enabled=False):
            h = F.silu(F.linear(t_freq, fc1.weight.float(), fc1.bias.float()))  # (N, D)
            return F.linear(h, fc2.weight.float(), fc2.bias.float())  # (N, D)


def _linear(layer: torch.nn.Module, x: torch.Tensor, ops: KernelOps, gelu: bool = False) -> torch.Tensor:
    """(..., K) -> (..., N): ``layer(x)`` (+ GELU) via ``ops.linear`` for a plain hook-free ``nn.Linear``."""
    if type(layer) is torch.nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks):
        return ops.linear(x, layer.weight, layer.bias, gelu)
    out = layer(x)
    return F.gelu(out, approximate="tanh") if gelu else out


class Attention(reference.Attention):
    """Self-attention: one fused qkv projection viewed as (N, T, 3, H, hd), a registry backend, the projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        qkv = _linear(self.qkv, x, ops).unflatten(-1, (3, self.num_heads, self.head_dim))  # (N, T, 3, H, hd), a view
        out = attention(qkv, self.backend)  # (N, T, H, hd)
        return _linear(self.proj, out.flatten(2), ops)  # (N, T, D)


class Mlp(reference.Mlp):
    """The reference MLP; fc1's bias + tanh-GELU in the GEMM epilogue where the kernel set's ``linear`` has one."""

    def forward(self, x: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        return _linear(self.fc2, _linear(self.fc1, x, ops, gelu=True), ops)  # (N, T, 4D) -> (N, T, D)


class DiTFastBlock(reference.DiTBlock):
    """A DiT block whose residual boundaries are fused ops; the reference block's modules and parameter names.

    ``forward`` starts by adding the previous block's pending MLP residual (fused with this block's first norm) and
    ends with its own MLP output un-added, so every boundary is one pass. A block needs only its own parameters
    (FSDP can wrap each block, checkpointing can recompute each block).
    """

    attention_cls = Attention
    mlp_cls = Mlp

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6):
        super().__init__(hidden_size, num_heads, mlp_ratio, mlp_norm_eps)
        self.kernels = "auto"

    def forward(self, x: torch.Tensor, silu_c: torch.Tensor, gate: torch.Tensor | None = None,
                branch: torch.Tensor | None = None, mod: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block.

        Args:
            x: (N, T, D) residual stream, without the previous block's MLP residual.
            silu_c: (N, D) ``silu(c)``, the conditioning after the adaLN's SiLU.
            gate, branch: (N, D) and (N, T, D), the previous block's ``gate_mlp`` and MLP output (None for block 0).
            mod: (N, 6D) this block's adaLN output when precomputed (the batched GEMM), else None.

        Returns:
            ``(x, gate_mlp, mlp_out)``: (N, T, D) stream after the attention residual, (N, D), (N, T, D).
        """
        ops = KERNELS[resolve_kernels(self.kernels, x.device.type)]
        if mod is None:
            mod = _adaln(self.adaLN_modulation[1], silu_c)  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        if branch is None:
            h = ops.modulated_layer_norm(x, shift_msa, scale_msa, self.norm1.eps)  # (N, T, D)
        else:
            x, h = ops.gated_residual_modulated_layer_norm(x, gate, branch, shift_msa, scale_msa, self.norm1.eps)
        x, h = ops.gated_residual_modulated_layer_norm(x, gate_msa, self.attn(h, ops), shift_mlp, scale_mlp,
                                                       self.norm2.eps)
        return x, gate_mlp, self.mlp(h, ops)

    def forward_from_branches(self, x: torch.Tensor, silu_c: torch.Tensor, gate: torch.Tensor | None = None,
                              branch: torch.Tensor | None = None, mod: torch.Tensor | None = None, *,
                              attn_out: torch.Tensor, mlp_out: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` with the attention and MLP outputs given, (N, T, D) each (step caching, ``dit_fast.cache``):
        no norm, attention or MLP runs, only the adaLN gates and the pending and attention residuals."""
        if mod is None:
            mod = _adaln(self.adaLN_modulation[1], silu_c)  # (N, 6D)
        _, _, gate_msa, _, _, gate_mlp = mod.chunk(6, dim=1)  # gate_mlp stays in the modulation's dtype, as forward's
        if branch is not None:
            x = torch.addcmul(x, gate.to(x.dtype).unsqueeze(1), branch.to(x.dtype))  # (N, T, D)
        return torch.addcmul(x, gate_msa.to(x.dtype).unsqueeze(1), attn_out.to(x.dtype)), gate_mlp, mlp_out


class FinalLayer(reference.FinalLayer):
    """The last block's MLP residual fused with the final adaLN LayerNorm, then Linear(D, p*p*out)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor, silu_c: torch.Tensor,
                ops: KernelOps) -> torch.Tensor:
        """x (N, T, D) stream, gate (N, D) / branch (N, T, D) the last block's pending MLP residual,
        silu_c (N, D) -> (N, T, p*p*out) tokens, each vector in (p, p, out) order."""
        mod = _adaln(self.adaLN_modulation[1], silu_c)  # (N, 2D)
        shift, scale = mod.chunk(2, dim=1)
        _, h = ops.gated_residual_modulated_layer_norm(x, gate, branch, shift, scale, self.norm_final.eps)
        return _linear(self.linear, h, ops)


class DiTFast(DiT):
    """Drop-in fast DiT: the reference ``DiT`` constructor (plus keyword-only backends), methods and state dict.

    Args (beyond the reference's):
        kernels: "auto", "triton" or "torch" (see the module docstring).
        attention: "auto" or a ``dit_fast.models.attention.BACKENDS`` name ("flash_attn", "sdpa", "math", ...).
        gradient_checkpointing: "none" (False), "full" (True: recompute each block in the backward) or
            "selective" (keep the GEMM and attention outputs, recompute the rest; ``dit_fast.models.checkpointing``);
            also settable as an attribute.

    Precision: run in fp32 (on CUDA, TF32 matmuls are the user's switch: ``torch.backends.cuda.matmul.allow_tf32 =
    True``), in bf16/fp16 for inference (``for_inference(torch.bfloat16)``: weights cast once, the residual stream
    in fp32), with bf16/fp16 weights (``model.to(torch.bfloat16)``) or under ``torch.autocast``; conditioning and
    norm statistics stay in fp32.

    Fast paths: inference (no grad) computes every block's adaLN in one GEMM with a cached concatenated weight;
    ``forward_with_cfg`` embeds the shared latent half once; ``compile()`` compiles the repeated block once
    (regional) or the whole model; ``cuda_graph()`` captures a fixed-shape forward for sampling loops.
    """

    patch_embed_cls = PatchEmbed
    timestep_embedder_cls = TimestepEmbedder
    block_cls = DiTFastBlock
    final_layer_cls = FinalLayer

    def __init__(self, input_size: int | tuple[int, int] = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True, *,
                 numerics: str = "official", per_block_conditioning: bool = False, kernels: str = "auto",
                 attention: str = "auto", gradient_checkpointing: bool | str = False):
        super().__init__(
            input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
            num_classes, learn_sigma, numerics=numerics, per_block_conditioning=per_block_conditioning,
        )
        self.gradient_checkpointing = gradient_checkpointing
        self.residual_dtype: torch.dtype | None = None  # None: the embedded tokens' dtype (see for_inference)
        self.activation_dtype: torch.dtype | None = None  # None: the weights' dtype (see for_inference)
        # name -> (key of the source parameters, stacked tensors): the inference paths' stacked weights
        self._stack_cache: dict[str, tuple[tuple[Any, ...], list[torch.Tensor]]] = {}
        self._capturing = False  # set by cuda_graph(): its warm-up and capture take the graph-safe path
        self.kernels = "auto"
        self.attention = "auto"
        self.set_kernels(kernels)
        self.set_attention_backend(attention)

    def for_inference(self, dtype: torch.dtype = torch.bfloat16, *,
                      residual_dtype: torch.dtype | None = torch.float32) -> DiTFast:
        """Cast once for sampling, in place, and return self: eval mode, no gradients, then ``set_precision``."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"for_inference: dtype must be float32, bfloat16 or float16, got {dtype}")
        return self.eval().requires_grad_(False).set_precision(dtype, residual_dtype=residual_dtype)

    def set_precision(self, dtype: torch.dtype, *, residual_dtype: torch.dtype | None = torch.float32) -> DiTFast:
        """Weights in ``dtype`` (cast once, in place; returns self) and the dtypes the forward computes in, leaving
        the train/eval mode and ``requires_grad`` alone (a move re-derives the activations'). bf16/fp16 weights keep the
        residual stream in ``residual_dtype`` (fp32: half the bf16 stream's error vs fp64; None: ``dtype``); on a CPU
        without bf16/fp16 GEMMs the activations stay fp32 too (weight-only: each GEMM widens its weight;
        ``activation_dtype``). fp32/fp64: the model as loaded (both reset). docs/kernels.md has the numbers."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"set_precision: dtype must be float32, bfloat16, float16 or float64, got {dtype}")
        self.to(dtype).residual_dtype = residual_dtype if dtype in (torch.bfloat16, torch.float16) else None
        self.activation_dtype = self._weight_only_activations()
        return self

    def _weight_only_activations(self) -> torch.dtype | None:
        """fp32 where reduced-precision weights sit on a CPU without GEMMs in their dtype (each GEMM widens its
        weight, the activations stay fp32), else None (the weights' dtype)."""
        dtype = self.pos_embed.dtype
        widened = (dtype in (torch.bfloat16, torch.float16) and self.pos_embed.is_cpu
                   and cpu_linear_route(dtype) == "onednn-fp32")
        return torch.float32 if widened and self.kernels != "torch" else None


    def set_kernels(self, name: str) -> None:
        """Use the "auto", "triton" or "torch" fused ops from now on (ImportError for triton when not installed)."""
        self.kernels = require_kernels(name)
        for block in self.blocks:
            block.kernels = name

    def set_attention_backend(self, name: str) -> None:
        """Use attention backend ``name`` ("auto" or a registry name) from now on; a missing package raises."""
        self.attention = require_backend(name)
        for block in self.blocks:
            block.attn.backend = name

    def _ops(self, x: torch.Tensor) -> KernelOps:
        return KERNELS[resolve_kernels(self.kernels, x.device.type)]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*c) tokens, each in (p, p, c) order -> (N, c, H, W) images."""
        return self._ops(x).unpatchify(x, self.patch_size, self.out_channels, self.config.grid_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps in 0..999, y (N,) labels -> (N, out_channels, H, W)."""
        self.check_inputs(x, t, y)
        return self._denoise(self._embed(x), t, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int | str = 3, interval: tuple[float, float] | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batched forward, with the official semantics (see the reference).

        The batch is ``[cond; uncond]`` and both halves read the first half of ``x``, so its patch embedding is
        computed once and shared; the transformer runs on the whole batch (the labels differ).
        """
        self.check_inputs(x, t, y)

        def forward_on_duplicated_half(combined: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            tokens = self._embed(combined[: combined.shape[0] // 2])  # (N/2, T, D), identical for both halves
            return self._denoise(torch.cat([tokens, tokens], dim=0), t, y)

        return guided_forward(forward_on_duplicated_half, x, t, y, cfg_scale, guide_channels, self.in_channels,
                              interval)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, H, W) -> tokens with positions (N, T, D), in ``residual_dtype`` when set."""
        tokens = self.x_embedder(x, self._ops(x), self.activation_dtype) + self.pos_embed
        return tokens if self.residual_dtype is None else tokens.to(self.residual_dtype)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Tokens (N, T, D), timesteps (N,), labels (N,) -> model output (N, out_channels, H, W)."""
        c = self.conditioning(t, y)  # (N, D), or (depth, N, D) per block; fp32
        silu_c = F.silu(c).to(self._adaln_dtype(x))  # cast once for every block's adaLN
        mods = self._batched_modulation(silu_c)  # (depth, N, 6D) or None
        per_block = silu_c.dim() == 3
        gate = branch = None
        for i, block in enumerate(self.blocks):
            mod = None if mods is None else mods[i]
            silu_c_i = silu_c[i] if per_block else silu_c  # (N, D)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, gate, branch = run_block(block, self.gradient_checkpointing, x, silu_c_i, gate, branch, mod)
            else:
                x, gate, branch = block(x, silu_c_i, gate, branch, mod)  # (N, T, D), (N, D), (N, T, D)
        ops = self._ops(x)
        out = self.final_layer(x, gate, branch, silu_c[0] if per_block else silu_c, ops)  # (N, T, p*p*out)
        return ops.unpatchify(out, self.patch_size, self.out_channels, self.config.grid_size)  # (N, out, H, W)

    def _adaln_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the adaLN linears compute in: autocast's when it is on, else their weights'."""
        if _autocasting(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.activation_dtype or self.final_layer.adaLN_modulation[1].weight.dtype

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_embedder(t) + y_embedder(y) in fp32: t (N,), y (N,) -> (N, D), or (depth, N, D) with per-block
        conditioning, whose inference computes every block's timestep MLP in two batched GEMMs and every label
        row in one gather (stacked fp32 weights, cached as the adaLN's)."""
        if not self.config.per_block_conditioning:
            return self.t_embedder(t) + self.y_embedder(y, self.training).float()  # (N, D)
        drop = label_drop_ids(y, self.config.class_dropout_prob, self.training)
        stacked = self._stacked("conditioning", [[te.mlp[0].weight, te.mlp[0].bias, te.mlp[2].weight, te.mlp[2].bias,
                                                  ye.embedding_table.weight]
                                                 for te, ye in zip(self.t_embedder, self.y_embedder, strict=True)],
                                torch.float32)
        if stacked is None:
            return torch.stack([te(t) + ye(y, self.training, drop).float()
                                for te, ye in zip(self.t_embedder, self.y_embedder, strict=True)])  # (depth, N, D)
        w1, b1, w2, b2, table = stacked  # (depth, D, 256), (depth, D), (depth, D, D), (depth, D), (depth, R, D)
        if drop is not None:
            y = torch.where(drop == 1, self.config.num_classes, y)
        t_freq = timestep_embedding(t, w1.shape[-1], freq_shift=self.t_embedder[0].freq_shift)  # (N, 256)
        with torch.autocast(t.device.type, enabled=False):
            h = F.silu(torch.baddbmm(b1.unsqueeze(1), t_freq.expand(w1.shape[0], -1, -1), w1.transpose(1, 2)))
            return torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)) + table[:, y]  # (depth, N, D)

    def _batched_modulation(self, silu_c: torch.Tensor) -> torch.Tensor | None:
        """Every block's adaLN output, (depth, N, 6D), in one GEMM; None where blocks must compute their own.

        ``silu_c`` is (N, D), shared by every block, or (depth, N, D), one row set per block (per-block
        conditioning): either way one ``baddbmm`` over the blocks. Only for inference (see ``_stacked``); the
        stacked weight is held in ``silu_c``'s dtype (autocast's under autocast), so no forward casts it.
        """
        linears = [block.adaLN_modulation[1] for block in self.blocks if isinstance(block, DiTFastBlock)]
        if len(linears) != len(self.blocks) or len(linears) == 0:
            return None  # blocks wrapped (FSDP, ...) own their parameters
        stacked = self._stacked("adaln", [[linear.weight, linear.bias] for linear in linears], silu_c.dtype)
        if stacked is None:
            return None
        weight, bias = stacked  # (depth, 6D, D), (depth, 6D)
        depth, n = weight.shape[0], silu_c.shape[-2]
        return torch.baddbmm(bias.unsqueeze(1), silu_c.expand(depth, n, -1), weight.transpose(1, 2))  # (depth, N, 6D)

    def _stacked(self, name: str, groups: list[list[torch.Tensor]], dtype: torch.dtype) -> list[torch.Tensor] | None:
        """``groups`` (one list of parameters per block) stacked per position into (depth, ...) tensors of
        ``dtype``, cached under ``name``; None where the blocks must use their own parameters.

        Only for inference: with gradients each block uses its own parameters (so FSDP can shard per block and the
        weight gradients need no scatter), and under compilation or CUDA-graph capture too (the cache is keyed on
        the parameters' storage and version counters, which neither can check). The cache is rebuilt whenever a
        parameter is replaced or modified in place (optimizer step, EMA update, load_state_dict) or cast.
        """
        params = [p for group in groups for p in group]
        if (self._capturing or torch.compiler.is_compiling()
                or (params[0].is_cuda and torch.cuda.is_current_stream_capturing())):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        if any(type(p.data) is not torch.Tensor for p in params):
            return None  # sharded or otherwise wrapped parameters (DTensor, ...)
        key = (dtype, *((p.data_ptr(), p._version) for p in params))
        cached = self._stack_cache.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, [torch.stack(parts).to(dtype) for parts in zip(*groups, strict=True)])
            self._stack_cache[name] = cached
        return cached[1]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> DiTFast:
        """Every move or cast (``to``, ``cuda``, ``float``, ...) drops the stacked weights (rebuilt on the next
        inference forward) and re-derives, for a model set up by ``set_precision``, the activations' dtype for where
        and what it is now: bf16 weights moved from an AVX2 CPU to a GPU compute in bf16."""
        self._stack_cache = {}
        super()._apply(fn, recurse)
        if self.residual_dtype is not None:
            self.activation_dtype = self._weight_only_activations()
        return self

    def compile(self, *, regional: bool = True, mode: str | None = None, fullgraph: bool = True,
                dynamic: bool | None = False, **kwargs: Any) -> DiTFast:
        """Compile in place with ``torch.compile`` and return self.

        ``regional=True`` compiles the repeated block once (every block shares its graphs: fast to compile, the
        rest stays eager); ``regional=False`` compiles the whole forward. ``mode="reduce-overhead"`` adds CUDA
        graphs (fixed-shape sampling loops on CUDA; best with ``regional=False``), ``"max-autotune"`` tunes GEMMs.
        Other ``kwargs`` go to ``torch.compile``.
        """
        if regional:
            for block in self.blocks:
                block.compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
        else:
            super().compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
        return self

    @torch.no_grad()
    def cuda_graph(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float | None = None,
                   warmup: int = 2, guide_channels: int | str = 3, interval: tuple[float, float] | None = None
                   ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Capture one inference forward (or ``forward_with_cfg`` when ``cfg_scale`` is given, with
        ``guide_channels`` and ``interval``) as a CUDA graph.

        Returns ``run(x, t, y)``, which copies its inputs (same shapes, dtypes and device as the examples) into the
        graph's static inputs, replays it and returns the static output (overwritten by the next call: clone it to
        keep it). For fixed-shape sampling loops, where per-kernel launch overhead dominates. Weights are read in
        place, so in-place updates (EMA) are seen; replacing parameter tensors needs a new capture. The warm-up
        runs the very path that is captured (each block's own adaLN, not the one GEMM whose concatenated weight is
        a snapshot). An active autocast context is captured with the graph.
        """
        if not x.is_cuda:
            raise ValueError(f"cuda_graph needs CUDA tensors, got x on {x.device}")
        self.check_inputs(x, t, y)
        static = [x.clone(), t.clone(), y.clone()]

        def call() -> torch.Tensor:
            if cfg_scale is None:
                return self(*static)
            return self.forward_with_cfg(*static, cfg_scale, guide_channels, interval)

        self._capturing = True
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # resolve backends, autotune and allocate outside the capture
                    call()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = call()
        finally:
            self._capturing = False

        def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for dst, src in zip(static, (x, t, y), strict=True):
                if src.shape != dst.shape or src.dtype != dst.dtype:
                    raise ValueError(f"captured for shape {tuple(dst.shape)} {dst.dtype}, got {tuple(src.shape)} "
                                     f"{src.dtype}")
                dst.copy_(src)
            graph.replay()
            return static_out

        return run


DiT_models: dict[str, Callable[..., DiTFast]] = model_constructors(DiTFast)
