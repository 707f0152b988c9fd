"""FP8 linears for DiT on Ada/Hopper GPUs: torchao's float8 training with rowwise scaling, off by default.

``enable_fp8(model)`` swaps, in place, the linears of the transformer blocks' token path (attention qkv and proj, MLP
fc1 and fc2: over 98% of DiT-XL/2's FLOPs) for ``torchao.float8.Float8Linear`` with the "rowwise" recipe: inputs,
weights and gradients quantised to e4m3 per row/column with power-of-two scales, the GEMMs in ``torch._scaled_mm``
with fp32 accumulation, the result in the autocast/weight dtype. The same modules serve training (forward and both
backward GEMMs in FP8) and inference. Weights stay in their dtype (fp32 master weights under the trainer's autocast):
the checkpoint's state dict keys and dtypes do not change.

Left in bf16/fp32, on purpose: the adaLN modulation linears (D -> 6D over one row per sample: a GEMM of batch-size
rows, too small for quantisation to pay, and their outputs scale and gate the residual stream of every block), the
timestep-embedding MLP (batch-size rows too), the patch embedding and the final linear (D -> p*p*2C = 32 outputs for
XL/2: tiny, and the model's output, where quantisation error lands undamped), the label embedding (a table lookup,
no GEMM) and any linear whose dimensions are not multiples of 16 (``_scaled_mm``'s requirement).

Refusals, one line each (``Fp8Unavailable``, a ``UserError``): not a CUDA device, a GPU before compute capability 8.9,
torchao missing (``pip install torchao``) or not importable with this torch.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import re

import torch
from torch import nn

from dit_fast.utils.validation import UserError

MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90): the first GPUs with FP8 tensor cores
# The token-path linears of a transformer block (DiT and DiTFast share these names).
_TOKEN_LINEAR = re.compile(r"(?:^|\.)blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))$")


class Fp8Unavailable(UserError):
    """FP8 was asked for where it cannot run; the message says why and what to do."""


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """Why FP8 linears cannot run on ``device`` (one line), or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper), "
                f"not the {device.type}")
    if not torch.cuda.is_available():
        return "--fp8 needs a CUDA GPU, and torch sees none"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"--fp8 needs compute capability >= 8.9 (Ada, Hopper); {torch.cuda.get_device_name(device)} is "
                f"sm_{capability[0]}{capability[1]}")
    return torchao_unavailable_reason()


def torchao_unavailable_reason() -> str | None:
    """Why ``torchao.float8`` cannot be used here (one line), or None."""
    if importlib.util.find_spec("torchao") is None:
        return "--fp8 needs torchao, which is not installed: pip install torchao"
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # a torchao built for another torch fails in many ways
        version = importlib.metadata.version("torchao")
        return f"--fp8: torchao {version} does not import with torch {torch.__version__} ({type(e).__name__}: {e})"
    return None


def fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """Whether the linear ``module`` at ``fqn`` becomes an FP8 linear: a block's qkv, proj, fc1 or fc2, with both
    dimensions multiples of 16."""
    return (isinstance(module, nn.Linear) and _TOKEN_LINEAR.search(fqn) is not None
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_linears(model: nn.Module, emulate: bool = False) -> list[str]:
    """Swap the selected linears of ``model`` for torchao ``Float8Linear`` (rowwise recipe), in place, with no
    device check; returns their names. ``emulate`` runs the FP8 GEMMs in emulation (any device: for tests)."""
    reason = torchao_unavailable_reason()
    if reason is not None:
        raise Fp8Unavailable(reason)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name("rowwise")
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    selected = [name for name, module in model.named_modules() if fp8_module_filter(module, name)]
    convert_to_float8_training(model, config=config, module_filter_fn=fp8_module_filter)
    return selected


def enable_fp8(model: nn.Module) -> list[str]:
    """Make ``model``'s block linears FP8 (see the module docstring), in place, after checking that its device can
    run them; returns the converted linears' names. Call after moving the model to its GPU, before ``compile``,
    FSDP and building the optimizer (the parameters are kept, so an existing optimizer stays valid)."""
    device = next(model.parameters()).device
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        raise Fp8Unavailable(reason)
    return convert_linears(model)


def fp8_linears(model: nn.Module) -> list[str]:
    """Names of ``model``'s FP8 linears (empty when FP8 is off)."""
    return [name for name, module in model.named_modules() if type(module).__name__ == "Float8Linear"]
