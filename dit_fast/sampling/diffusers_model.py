"""``DiffusersDiT``: a DiTFast behind the interface of diffusers' ``DiTTransformer2DModel`` (a diffusers ``ModelMixin``,
so that a pipeline saves, moves and offloads it as its own); built by ``dit_fast.accelerate``
(``dit_fast.sampling.diffusers_pipeline``), which says what stays true of the pipeline. Importing this module imports
diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dit_fast.cache import StepCache, parse_cache
from dit_fast.checkpoints import (
    config_from_diffusers,
    from_diffusers_state_dict,
    to_diffusers_state_dict,
    with_diffusers_conditioning,
)
from dit_fast.models.attention import BACKENDS
from dit_fast.models.cuda_graph import CUDAGraphRunner
from dit_fast.models.dit import DiTFast

try:  # this module serves diffusers pipelines: diffusers is its one requirement beyond dit-fast's
    from diffusers import ConfigMixin, DiTTransformer2DModel, ModelMixin
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
except ImportError as e:  # pragma: no cover - exercised where diffusers is absent
    raise ImportError("dit_fast.accelerate serves diffusers pipelines and needs diffusers: "
                      "pip install 'dit-fast[diffusers]'") from e

DIFFUSERS_ENTRY = ("diffusers", "DiTTransformer2DModel")  # what model_index.json records for the transformer


def cast_for_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The one place where an accelerated DiT's weights change dtype (conversion, every ``.to(dtype)``): once, so
    bf16/fp16 forwards run on weights of that dtype with no per-step autocast. A ``DiTFast`` takes its own precision
    path, ``DiTFast.set_precision`` (bf16/fp16: an fp32 residual stream, and fp32 activations where the CPU has no
    bf16/fp16 GEMM; fp32/fp64 reset both), which leaves the train/eval mode and ``requires_grad`` as they are; the
    reference ``DiT`` is cast as it is."""
    if isinstance(model, DiTFast):
        return model.set_precision(dtype)
    return model.to(dtype)


class DiffusersDiT(ModelMixin, ConfigMixin):
    """A ``DiTFast`` behind the interface of diffusers' ``DiTTransformer2DModel`` (what ``DiTPipeline`` calls).

    Args:
        model: a ``DiTFast`` computing diffusers' numerics (or the reference ``DiT``, without ``cuda_graph``).
        config: the ``DiTTransformer2DModel`` config it serves (``sample_size``, ``in_channels``, ...).
        cuda_graph: replay CUDA graphs of the forward (one capture per input shape and dtype); CUDA tensors only.
        cache: a ``dit_fast.cache`` spec or policy (None: off); ``num_steps`` tells "auto" the run's steps.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _supports_group_offloading = False

    def __init__(self, model: DiTFast, config: Mapping[str, Any], *, cuda_graph: bool = False, cache: Any = None,
                 num_steps: Callable[[], int | None] = lambda: None):
        super().__init__()
        self.register_to_config(**{k: v for k, v in dict(config).items() if not k.startswith("_")})
        self.model = model
        self.cuda_graph = cuda_graph
        self._graphs: CUDAGraphRunner | None = None  # built on the first graphed forward
        self.set_cache(cache, num_steps)

    def set_cache(self, cache: Any, num_steps: Callable[[], int | None] = lambda: None) -> None:
        """Step caching from now on: a ``dit_fast.cache`` spec ("auto", "fora:2", ...), a policy, or None (off)."""
        parse_cache(cache, 1)  # a malformed spec fails here, not mid-sampling
        if cache is not None and (self.cuda_graph or _is_compiled(self.model)):
            raise ValueError("cache= decides per step in Python; it cannot run with cuda_graph=True or compile=")
        if getattr(self, "step_cache", None) is not None:
            self.step_cache.remove()
        self.cache, self._num_steps = cache, num_steps
        self.step_cache: StepCache | None = None  # the current (or last) run's cache: full_steps, cached_steps
        self._last_t: float | None = None

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float | None = None,
                class_labels: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                return_dict: bool = True) -> Any:
        """hidden_states (N, C, H, W), timestep (a number, 0-dim, (1,) or (N,)), class_labels (N,) ->
        ``Transformer2DModelOutput(sample=(N, out_channels, H, W))``, or ``(sample,)`` with ``return_dict=False``."""
        if cross_attention_kwargs:
            raise ValueError(f"DiT has no cross-attention; got cross_attention_kwargs {sorted(cross_attention_kwargs)}")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
            raise ValueError("hidden_states must be a (N, C, H, W) tensor, got "
                             f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
        if class_labels is None:
            raise ValueError("class_labels is required: DiT is class-conditional (use the null class "
                             f"{self.config.num_embeds_ada_norm} for unconditional samples)")
        n, device = hidden_states.shape[0], hidden_states.device
        t = broadcast_timesteps(timestep, n, device)
        y = torch.as_tensor(class_labels, device=device).reshape(-1)
        if self.cache is not None:
            self._begin_cached_step(t)
        if self.cuda_graph:
            if not hidden_states.is_cuda:
                raise ValueError(f"cuda_graph=True needs CUDA inputs, got hidden_states on {device}; move the "
                                 "pipeline first (pipe.to('cuda'))")
            if self._graphs is None:
                self._graphs = CUDAGraphRunner(self.model)
            sample = self._graphs(hidden_states, t, y)
        else:
            sample = self.model(hidden_states, t, y)  # (N, out_channels, H, W)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def _begin_cached_step(self, t: torch.Tensor) -> None:
        """A new sampling run starts when the timestep goes up (every scheduler counts down within a run)."""
        now = float(t.max())
        if self.step_cache is None or self._last_t is None or now > self._last_t:
            if self.step_cache is not None:
                self.step_cache.remove()
            self.step_cache = StepCache(self.model, parse_cache(self.cache, self._num_steps()))
            self.step_cache.install()
        self._last_t = now

    def to(self, *args: Any, **kwargs: Any) -> DiffusersDiT:
        """``nn.Module.to``; a floating dtype goes through ``cast_for_inference``. (A device move needs nothing more:
        ``DiTFast``'s own ``_apply`` re-derives its bf16 settings for the new device.)"""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is None or not dtype.is_floating_point:
            return super().to(*args, **kwargs)
        kwargs.pop("dtype", None)
        args = tuple(a for a in args if not isinstance(a, torch.dtype))
        moved = super().to(*args, **kwargs) if args or kwargs else self
        cast_for_inference(moved.model, dtype)
        moved._graphs = None  # a dtype-only cast skips _apply; the captures read the old weights
        return moved

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> DiffusersDiT:
        self._graphs = None  # captures read the old tensors: recapture after a move
        return super()._apply(fn, recurse)

    def to_diffusers(self) -> nn.Module:
        """A new ``DiTTransformer2DModel`` with this model's current weights (exact; its own storage), on the same
        device, in the same dtype and train/eval mode."""
        config = self.model.config
        state_dict = to_diffusers_state_dict(self.model.state_dict(), config)
        with torch.device("meta"):
            transformer = DiTTransformer2DModel.from_config(dict(self.config))
        transformer.load_state_dict(state_dict, strict=True, assign=True)
        _fill_diffusers_pos_embed(transformer, self.device)
        return transformer.train(self.training)

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> None:
        """Write a stock ``DiTTransformer2DModel`` folder (``DiTTransformer2DModel.save_pretrained``'s arguments:
        ``variant``, ``safe_serialization``, ``max_shard_size``, ...): diffusers loads it without dit-fast."""
        self.to_diffusers().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> DiffusersDiT:
        """``DiTTransformer2DModel.from_pretrained(...)`` (its arguments), accelerated."""
        return from_diffusers_transformer(DiTTransformer2DModel.from_pretrained(pretrained_model_name_or_path,
                                                                                **kwargs))

    # ---------------------------------------------------------------- diffusers' switches, honoured or refused

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable[..., Any] | None = None) -> None:
        if gradient_checkpointing_func is not None:
            raise NotImplementedError("DiTFast checkpoints its blocks with torch.utils.checkpoint; a custom "
                                      "gradient_checkpointing_func is not supported")
        self.model.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing not in (False, "none")

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        """``enable_xformers_memory_efficient_attention()``: DiTFast's xformers backend (ImportError if missing)."""
        if attention_op is not None:
            raise NotImplementedError("DiTFast's xformers backend picks its own kernel; attention_op is not supported")
        self.model.set_attention_backend("xformers" if valid else "auto")

    def set_attention_backend(self, backend: str) -> None:
        """A ``dit_fast.attention`` backend name (diffusers' own dispatch backends do not apply to DiTFast)."""
        if backend not in BACKENDS and backend != "auto":
            raise ValueError(f"DiTFast uses its own attention backends ({', '.join(BACKENDS)} or auto), not "
                             f"diffusers' {backend!r}")
        self.model.set_attention_backend(backend)

    def reset_attention_backend(self) -> None:
        self.model.set_attention_backend("auto")

    def compile_repeated_blocks(self, *args: Any, **kwargs: Any) -> None:
        """Regional compilation: ``DiTFast.compile(regional=True, ...)`` (``torch.compile`` keyword arguments)."""
        if args:
            raise TypeError("compile_repeated_blocks takes torch.compile keyword arguments only")
        self.model.compile(regional=True, **kwargs)

    def set_use_npu_flash_attention(self, valid: bool) -> None:
        raise NotImplementedError("DiTFast has no NPU flash attention; use accelerate(pipe, attention=...)")

    def set_use_xla_flash_attention(self, use_xla_flash_attention: bool, partition_spec: Any = None,
                                    **kwargs: Any) -> None:
        raise NotImplementedError("DiTFast has no XLA flash attention; use accelerate(pipe, attention=...)")

    def enable_layerwise_casting(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("DiTFast does not support layerwise casting: cast the pipeline once "
                                  "(pipe.to(torch.bfloat16))")

    def enable_parallelism(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("DiTFast does not support diffusers' context parallelism")

    def extra_repr(self) -> str:
        return f"cuda_graph={self.cuda_graph}, cache={self.cache!r}"


def _is_compiled(model: nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in (model, *model.blocks))


def _fill_diffusers_pos_embed(transformer: nn.Module, device: torch.device) -> None:
    """Recompute diffusers' (non-persistent) sin-cos buffer after a meta-device build, as its constructor does."""
    embed = transformer.pos_embed
    table = get_2d_sincos_pos_embed(embed.pos_embed.shape[-1], int(embed.pos_embed.shape[1] ** 0.5),
                                    base_size=embed.base_size, interpolation_scale=embed.interpolation_scale,
                                    output_type="pt")  # (T, D)
    embed.pos_embed = table.float().unsqueeze(0).to(device)  # (1, T, D)


def broadcast_timesteps(timestep: torch.Tensor | float | None, n: int, device: torch.device) -> torch.Tensor:
    """A timestep as diffusers' models accept it -> (n,) on ``device``, dtype kept (int or float).

    Accepts a Python number, a 0-dim tensor, a (1,) tensor (broadcast to every sample) or an (n,) tensor.
    """
    if timestep is None:
        raise ValueError("timestep is required: a number, a 0-dim tensor, or one timestep per sample (N,)")
    t = torch.as_tensor(timestep, device=device)
    if t.dim() == 0 or t.shape == (1,):
        return t.reshape(1).expand(n)
    if t.shape != (n,):
        raise ValueError(f"timestep must be a number, a 0-dim or (1,) tensor, or shape ({n},) for {n} samples; got "
                         f"shape {tuple(t.shape)}")
    return t


def from_diffusers_transformer(transformer: nn.Module, *, attention: str = "auto", kernels: str = "auto",
                               cuda_graph: bool = False, cache: Any = None,
                               num_steps: Callable[[], int | None] = lambda: None) -> DiffusersDiT:
    """A diffusers ``DiTTransformer2DModel`` -> a :class:`DiffusersDiT` serving a ``DiTFast`` with its weights.

    The new model computes diffusers' numerics, with one embedder per block when the transformer's copies differ,
    lives on the transformer's device in its dtype, copies its train/eval mode and owns its weights: the
    transformer itself is not modified and shares no storage with it.
    """
    meta = {**dict(transformer.config), "_class_name": type(transformer).__name__}
    source = f"{type(transformer).__name__} weights"
    config = config_from_diffusers(meta, numerics="diffusers", source=f"{type(transformer).__name__}.config")
    diffusers_sd = transformer.state_dict()
    config = with_diffusers_conditioning(diffusers_sd, config)
    state_dict, _ = from_diffusers_state_dict(diffusers_sd, config, source=source)
    first = next(transformer.parameters())
    with torch.device("meta"):  # no init work: every tensor comes from the state dict
        model = DiTFast.from_config(config, kernels=kernels, attention=attention)
    owned = {k: v.detach().to(device=first.device, copy=True) for k, v in state_dict.items()}
    model.load_state_dict(owned, strict=True, assign=True)  # copies: the transformer's weights are not shared
    model = cast_for_inference(model, first.dtype)
    model.train(transformer.training).requires_grad_(first.requires_grad)
    fast = DiffusersDiT(model, transformer.config, cuda_graph=cuda_graph, cache=cache, num_steps=num_steps)
    return fast.train(transformer.training)
