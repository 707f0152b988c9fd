"""Our converter against diffusers' own ``DiTTransformer2DModel``: loading both ways and forward parity.

diffusers' DiT takes ``hidden_states`` (N, C, H, W), ``timestep`` (N,) and ``class_labels`` (N,) and returns
``.sample`` (N, out_channels, H, W), the same layout as ``DiT.forward``. Its numerics differ from the paper's in two
constants (timestep frequencies / 127, MLP-norm eps 1e-5): a model loaded with ``numerics="diffusers"`` must match
its forward to fp32 rounding, and the default official numerics must differ measurably.
"""

import importlib.util

import pytest
import safetensors.torch
import torch

from dit_fast.checkpoints import load_checkpoint, save_diffusers, to_diffusers_config
from dit_fast.models.config import DiTConfig
from dit_fast.reference import DiT
from tests.helpers import assert_close, max_rel_err

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                reason="diffusers is not installed (pip install 'dit-fast[diffusers]')")

CONFIGS = {
    "tiny": DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10),
    "odd": DiTConfig(input_size=12, patch_size=2, hidden_size=144, depth=3, num_heads=2, num_classes=10),
}
ROUNDING = 1e-5  # fp32 forward-to-forward agreement (norm-wise relative error)


def _inputs(config: DiTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, config.in_channels, *config.grid_input, generator=g)  # (N, C, H, W)
    t = torch.tensor([0, 17, 500, 999])  # (N,) timestep indices
    y = torch.tensor([3, 0, config.num_classes, 9])  # (N,) labels, the null class included
    return x, t, y


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (not the zero adaLN init), so a mapping mistake anywhere shows in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)


def _diffusers_forward(model: torch.nn.Module, config: DiTConfig) -> torch.Tensor:
    x, t, y = _inputs(config)
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample  # (N, out, H, W)


def _ours_forward(model: torch.nn.Module, config: DiTConfig) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs(config))  # (N, out, H, W)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_to_dit_fast(tmp_path, name):
    from diffusers import DiTTransformer2DModel

    config = CONFIGS[name]
    reference = DiTTransformer2DModel(**{k: v for k, v in to_diffusers_config(config).items() if k[0] != "_"})
    _randomize(reference, seed=1)
    with torch.no_grad():  # one shared embedder, copied into every block as in real diffusers DiT checkpoints
        for block in reference.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(reference.transformer_blocks[0].norm1.emb.state_dict())
    reference.eval().save_pretrained(tmp_path / "transformer")  # diffusers writes the folder itself
    expected = _diffusers_forward(reference, config)

    matched = load_checkpoint(tmp_path / "transformer", numerics="diffusers")  # strict load
    assert matched.format == "diffusers" and matched.numerics == "diffusers"
    assert matched.config == config.replace(numerics="diffusers")
    out = _ours_forward(matched.model, config)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name=f"{name} numerics=diffusers vs diffusers")
    assert max_rel_err(out, expected) < ROUNDING

    official = load_checkpoint(tmp_path / "transformer")
    assert official.numerics == "official" and official.config == config
    difference = max_rel_err(_ours_forward(official.model, config), expected)
    assert difference > 100 * ROUNDING, f"official numerics should differ from diffusers' forward, got {difference:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dit_fast_to_diffusers(tmp_path, name):
    from diffusers import DiTTransformer2DModel

    config = CONFIGS[name]
    ours = DiT.from_config(config.replace(numerics="diffusers")).eval()
    _randomize(ours, seed=2)
    save_diffusers(ours, tmp_path / "transformer")
    theirs, info = DiTTransformer2DModel.from_pretrained(tmp_path / "transformer", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    written = safetensors.torch.load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(theirs.state_dict()) == set(written)
    expected = _ours_forward(ours, config)
    out = _diffusers_forward(theirs.eval(), config)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name=f"{name} diffusers vs numerics=diffusers")
    assert max_rel_err(out, expected) < ROUNDING
