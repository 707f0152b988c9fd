"""dit-fast: fast, faithful Diffusion Transformers (Peebles & Xie).

- ``dit_fast.reference.DiT``: the paper's model in plain PyTorch (official state-dict layout).
- ``dit_fast.DiTFast``: the same model (constructor, methods, state dict) with fused kernels and fast attention;
  ``dit_fast.DiT_models["DiT-XL/2"](...)`` builds one.
- ``dit_fast.gflops`` / ``dit_fast.param_count``: cost in the paper's convention; ``dit_fast.CONFIGS``: the zoo.
- ``dit_fast.enable_fp8(model)``: the blocks' linears in FP8 (torchao float8 rowwise; Ada/Hopper GPUs), in place.
- ``dit_fast.accelerate(pipe)``: serve a diffusers ``DiTPipeline``'s transformer with DiTFast, same images
  (``dit_fast.sampling.diffusers_pipeline``; ``import dit_fast`` does not import diffusers, accessing ``accelerate``
  does).

How the modules fit together (layers, one training step, one sampling step): ARCHITECTURE.md at the repository root.
``DiTFast``, ``DiT_models`` and ``accelerate`` are imported from their modules on first use, so that
``import dit_fast`` (and the ``dit-fast`` commands that need no model) do not load the kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

from dit_fast.models.config import CONFIGS, DiTConfig, get_config, gflops, param_count

__version__ = "0.1.0"

__all__ = ["CONFIGS", "DiTConfig", "DiTFast", "DiT_models", "accelerate", "enable_fp8", "get_config", "gflops",
           "param_count", "__version__"]

_LAZY = {"DiTFast": "dit_fast.models.dit", "DiT_models": "dit_fast.models.dit",
         "accelerate": "dit_fast.sampling.diffusers_pipeline", "enable_fp8": "dit_fast.models.fp8"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dit_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
