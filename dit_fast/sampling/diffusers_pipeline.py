"""One-call acceleration of diffusers' ``DiTPipeline``: ``dit_fast.accelerate(pipe)``.

::

    pipe = DiTPipeline.from_pretrained("path/to/DiT-XL-2-256")   # a local copy (dit-fast downloads nothing)
    dit_fast.accelerate(pipe)                                     # in place; returns pipe
    images = pipe(class_labels=[207, 360], num_inference_steps=25, generator=torch.manual_seed(0)).images

``accelerate`` converts the pipeline's ``DiTTransformer2DModel`` weights (``dit_fast.checkpoints``) into a
:class:`~dit_fast.DiTFast` computing diffusers' numerics and puts it behind :class:`DiffusersDiT`, a module with the
interface the pipeline uses (``config``, ``dtype``, ``device``, ``.to``, diffusers' ``forward`` signature and
output). The pipeline itself is unchanged (guidance, learned variance, scheduler), so the images are the same up to
float rounding. Options: ``attention=``, ``kernels=``, ``compile=`` and ``cuda_graph=`` (CUDA only).
docs/diffusers.md describes the interface, the options and how to save an accelerated pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dit_fast.checkpoints import config_from_diffusers, from_diffusers_state_dict
from dit_fast.models.dit import DiTFast

GraphKey = tuple[tuple[int, ...], torch.dtype, torch.dtype, torch.dtype]


class DiffusersDiT(nn.Module):
    """A DiT of ours behind the interface of diffusers' ``DiTTransformer2DModel`` (what ``DiTPipeline`` calls).

    Args:
        model: a ``DiTFast`` (or any DiT of ours: ``forward(x (N, C, H, W), t (N,), y (N,))``) computing diffusers'
            numerics.
        config: the diffusers config the pipeline reads (``sample_size``, ``in_channels``, ``out_channels``); a
            diffusers ``FrozenDict`` (attribute access) or any mapping.
        cuda_graph: replay CUDA graphs of the forward (one capture per input shape); CUDA tensors only.
    """

    def __init__(self, model: nn.Module, config: Mapping[str, Any], *, cuda_graph: bool = False):
        super().__init__()
        self.model = model
        self.config = config if hasattr(config, "sample_size") else _AttributeDict(config)
        self.cuda_graph = cuda_graph
        self._graphs: dict[GraphKey, Callable[..., torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the pipeline draws its latents in it)."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float | None = None,
                class_labels: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                return_dict: bool = True) -> Any:
        """hidden_states (N, C, H, W), timestep (see the module docstring), class_labels (N,) ->
        ``Transformer2DModelOutput(sample=(N, out_channels, H, W))``, or ``(sample,)`` with ``return_dict=False``.

        ``cross_attention_kwargs`` exists for signature compatibility; DiT has no cross-attention, so it must be
        None or empty.
        """
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
        if self.cuda_graph:
            sample = self._replay(hidden_states, t, y)
        else:
            sample = self.model(hidden_states, t, y)  # (N, out_channels, H, W)
        if not return_dict:
            return (sample,)
        return _output_class()(sample=sample)

    def _replay(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The forward as a CUDA graph captured for this input signature (captured on first use); a fresh tensor."""
        if not x.is_cuda:
            raise ValueError(f"cuda_graph=True needs CUDA inputs, got hidden_states on {x.device}; move the pipeline "
                             "first (pipe.to('cuda'))")
        key = (tuple(x.shape), x.dtype, t.dtype, y.dtype)
        if key not in self._graphs:
            self.model.check_inputs(x, t, y)  # outside the capture, where the label range can be read
            self._graphs[key] = self.model.cuda_graph(x, t, y)
        return self._graphs[key](x, t, y).clone()  # the static output is overwritten by the next replay

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> DiffusersDiT:
        self._graphs = {}  # captured graphs read the old tensors: recapture after .to() / .half() / .cuda()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"cuda_graph={self.cuda_graph}"


class _AttributeDict(dict):
    """A config mapping with attribute access (``config.sample_size``), as diffusers' ``FrozenDict`` has."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


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


def _output_class() -> type:
    """diffusers' ``Transformer2DModelOutput`` (its module moved between diffusers versions)."""
    try:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
    except ImportError:
        from diffusers.models.transformers.transformer_2d import Transformer2DModelOutput
    return Transformer2DModelOutput


def from_diffusers_transformer(transformer: nn.Module, *, attention: str = "auto", kernels: str = "auto",
                               cuda_graph: bool = False) -> DiffusersDiT:
    """A diffusers ``DiTTransformer2DModel`` -> a :class:`DiffusersDiT` serving a ``DiTFast`` with its weights.

    The new model computes diffusers' numerics, lives on the transformer's device in its dtype and copies its
    train/eval mode; the transformer itself is not modified. diffusers copies the timestep and label embedders into
    every block; those copies must be identical, as in every released DiT checkpoint (a freshly constructed
    ``DiTTransformer2DModel`` draws each block's copy at random and is refused with a ``CheckpointError``).
    """
    meta = dict(transformer.config)
    meta.setdefault("_class_name", type(transformer).__name__)
    config = config_from_diffusers(meta, numerics="diffusers", source=f"{type(transformer).__name__}.config")
    first = next(transformer.parameters())
    state_dict, _ = from_diffusers_state_dict(transformer.state_dict(), config,
                                              source=f"{type(transformer).__name__} weights")
    with torch.device("meta"):  # no init work: every tensor comes from the state dict
        model = DiTFast.from_config(config, kernels=kernels, attention=attention)
    owned = {k: v.detach().to(device=first.device, dtype=first.dtype, copy=True) for k, v in state_dict.items()}
    model.load_state_dict(owned, strict=True, assign=True)  # copies: the transformer's weights are not shared
    model.train(transformer.training)
    model.requires_grad_(first.requires_grad)
    return DiffusersDiT(model, transformer.config, cuda_graph=cuda_graph).train(transformer.training)


def accelerate(pipe: Any, *, attention: str = "auto", kernels: str = "auto", compile: bool | Mapping[str, Any] = False,
               cuda_graph: bool = False) -> Any:
    """Serve a diffusers ``DiTPipeline``'s transformer with DiTFast, in place; returns ``pipe``.

    ``pipe`` is a ``DiTPipeline`` (any pipeline with a DiT ``transformer``), whose ``transformer`` is replaced, or
    a bare ``DiTTransformer2DModel``, for which the replacement :class:`DiffusersDiT` is returned. A pipeline or
    model that is already accelerated gets the new options. Options:

    - ``attention``: an attention backend name of ``dit_fast.models.attention`` or "auto" (a missing package raises);
    - ``kernels``: "auto", "triton" or "torch" (``DiTFast``'s fused ops);
    - ``compile``: ``True`` or a dict of ``DiTFast.compile`` keyword arguments (regional by default);
    - ``cuda_graph``: capture the forward as CUDA graphs (the transformer must be on a CUDA device).
    """
    is_pipeline = hasattr(pipe, "transformer") and isinstance(pipe.transformer, nn.Module)
    transformer = pipe.transformer if is_pipeline else pipe
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"accelerate() takes a diffusers DiTPipeline or DiTTransformer2DModel, got "
                        f"{type(pipe).__name__}")
    if cuda_graph and next(transformer.parameters()).device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the transformer on a CUDA device, it is on "
                         f"{next(transformer.parameters()).device}: move it first (pipe.to('cuda'))")
    if compile is not True and compile is not False and not isinstance(compile, Mapping):
        raise TypeError(f"compile must be True, False or a dict of DiTFast.compile arguments, got {compile!r}")
    if isinstance(transformer, DiffusersDiT):
        fast = transformer
        fast.model.set_attention_backend(attention)
        fast.model.set_kernels(kernels)
        fast.cuda_graph = cuda_graph
        fast._graphs = {}
    else:
        fast = from_diffusers_transformer(transformer, attention=attention, kernels=kernels, cuda_graph=cuda_graph)
    if compile is not False:
        fast.model.compile(**({} if compile is True else dict(compile)))
    if not is_pipeline:
        return fast
    pipe.transformer = fast  # DiffusionPipeline.__setattr__ also updates the pipeline's config entry
    return pipe
