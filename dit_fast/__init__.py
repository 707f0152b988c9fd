"""dit-fast: fast, faithful Diffusion Transformers (Peebles & Xie).

- ``dit_fast.reference.DiT``: the paper's model in plain PyTorch (official state-dict layout).
- ``dit_fast.DiTFast``: the same model (constructor, methods, state dict) with fused kernels and fast attention;
  ``dit_fast.DiT_models["DiT-XL/2"](...)`` builds one.
- ``dit_fast.gflops`` / ``dit_fast.param_count``: cost in the paper's convention; ``dit_fast.CONFIGS``: the zoo.
"""

from dit_fast.config import CONFIGS, DiTConfig, get_config, gflops, param_count
from dit_fast.model import DiT_models, DiTFast

__version__ = "0.1.0"

__all__ = ["CONFIGS", "DiTConfig", "DiTFast", "DiT_models", "get_config", "gflops", "param_count", "__version__"]
