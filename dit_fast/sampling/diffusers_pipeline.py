"""One-call acceleration of diffusers' ``DiTPipeline``: ``dit_fast.accelerate(pipe)``.

::

    pipe = DiTPipeline.from_pretrained("path/to/DiT-XL-2-256", torch_dtype=torch.bfloat16)  # a local copy
    dit_fast.accelerate(pipe, cache="auto")        # in place; returns pipe
    images = pipe(class_labels=[207, 360], num_inference_steps=25, generator=torch.manual_seed(0)).images
    pipe.save_pretrained("out")                    # a stock diffusers folder: loads without dit-fast

``accelerate`` converts the pipeline's ``DiTTransformer2DModel`` (any size, patch 2 or 4, learned sigma or not;
per-block embedder copies that differ become per-block conditioning) into a ``DiTFast`` computing diffusers'
numerics, behind ``dit_fast.sampling.diffusers_model.DiffusersDiT``, a diffusers ``ModelMixin`` with the
transformer's interface (``config``, ``dtype``, ``device``, ``forward(hidden_states, timestep, class_labels,
return_dict)``). ``pipe.transformer`` and ``pipe.components`` return it; ``pipe.to`` casts its weights once;
``pipe.save_pretrained`` writes a stock ``DiTTransformer2DModel`` folder; the transformer it replaced stays an
unchanged diffusers model sharing no storage with it. Options: ``attention=``, ``kernels=``, ``compile=``,
``cuda_graph=`` and ``cache=`` (step caching over each pipeline call). docs/diffusers.md lists the contract item by
item with its test.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from dit_fast.sampling.diffusers_model import DIFFUSERS_ENTRY, DiffusersDiT, from_diffusers_transformer


def accelerate(pipe: Any, *, attention: str = "auto", kernels: str = "auto", compile: bool | Mapping[str, Any] = False,
               cuda_graph: bool = False, cache: Any = None) -> Any:
    """Serve a diffusers ``DiTPipeline``'s transformer with DiTFast, in place; returns ``pipe``.

    ``pipe`` is a ``DiTPipeline`` (any pipeline with a DiT ``transformer``), whose ``transformer`` is replaced, or
    a bare ``DiTTransformer2DModel``, for which the replacement :class:`DiffusersDiT` is returned. A pipeline or
    model that is already accelerated gets the new options. Options:

    - ``attention``: an attention backend name of ``dit_fast.attention`` or "auto" (a missing package raises);
    - ``kernels``: "auto", "triton" or "torch" (``DiTFast``'s fused ops);
    - ``compile``: ``True`` or a dict of ``DiTFast.compile`` keyword arguments (regional by default);
    - ``cuda_graph``: capture the forward as CUDA graphs (the transformer must be on a CUDA device);
    - ``cache``: step caching over each pipeline call: "auto" (the measured policy for the scheduler's number of
      steps) or a ``dit_fast.cache`` spec ("fora:2", "taylor:4:2", "adaptive:0.15:4"); None (default) is off.
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
    if cache is not None and (compile is not False or cuda_graph):
        raise ValueError("cache= decides per step in Python; it cannot be combined with compile= or cuda_graph=True")
    num_steps = _scheduler_steps(pipe) if is_pipeline else (lambda: None)
    if isinstance(transformer, DiffusersDiT):
        fast = transformer
        fast.model.set_attention_backend(attention)
        fast.model.set_kernels(kernels)
        fast.cuda_graph = cuda_graph
        fast._graphs = None
        fast.set_cache(cache, num_steps)
    else:
        fast = from_diffusers_transformer(transformer, attention=attention, kernels=kernels, cuda_graph=cuda_graph,
                                          cache=cache, num_steps=num_steps)
    if compile is not False:
        fast.model.compile(**({} if compile is True else dict(compile)))
    if not is_pipeline:
        return fast
    pipe.transformer = fast  # DiffusionPipeline.__setattr__ records (library, class) in the pipeline's config
    pipe.register_to_config(transformer=DIFFUSERS_ENTRY)  # what save_pretrained writes: diffusers' class
    return pipe


def _scheduler_steps(pipe: Any) -> Callable[[], int | None]:
    """The pipeline scheduler's current number of timesteps (read at each run's start; the pipeline may swap its
    scheduler), through a weak reference so that the transformer does not keep the pipeline alive."""
    ref = weakref.ref(pipe)

    def steps() -> int | None:
        timesteps = getattr(getattr(ref(), "scheduler", None), "timesteps", None)
        return None if timesteps is None else len(timesteps)

    return steps
