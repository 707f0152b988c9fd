"""``dit_fast.accelerate(pipe)``: a tiny random diffusers ``DiTPipeline`` gives the same images after acceleration.

The pipeline (random ``DiTTransformer2DModel``, small random ``AutoencoderKL``) is run with DDIM and DPM-Solver, with
guidance on (the batch doubled, the null class 1000) and off, before and after ``accelerate``, from the same
generator: the fp32 images must agree to 1e-3 of the image range [0, 1].
"""

import copy
import importlib.util
import subprocess
import sys

import pytest
import torch

import dit_fast
from dit_fast.checkpoints import CheckpointError
from dit_fast.models.dit import DiTFast
from dit_fast.sampling.diffusers_pipeline import DiffusersDiT, broadcast_timesteps

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                reason="diffusers is not installed (pip install 'dit-fast[diffusers]')")

IMAGE_TOL = 1e-3  # of the image range [0, 1]
LABELS = [3, 999, 0]


def _transformer(learn_sigma: bool = True, seed: int = 0) -> torch.nn.Module:
    """A random DiT (hidden 64, 2 blocks, 8x8 latents, 1000 classes) with one shared embedder, as real checkpoints."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                  out_channels=8 if learn_sigma else 4, num_layers=2, sample_size=8,
                                  num_embeds_ada_norm=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)  # every weight random (no zero adaLN init), so any mapping error shows
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


def _vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1).eval()


def _scheduler(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    return {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]()


def _pipeline(scheduler: str = "ddim", learn_sigma: bool = True):
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=_transformer(learn_sigma), vae=_vae(), scheduler=_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, guidance_scale: float, steps: int = 4, labels: list[int] = LABELS) -> torch.Tensor:
    out = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images  # (N, 3, 16, 16) in [0, 1]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_same_images(scheduler, guidance_scale):
    pipe = _pipeline(scheduler)
    before = _images(pipe, guidance_scale)
    assert dit_fast.accelerate(pipe) is pipe
    assert isinstance(pipe.transformer, DiffusersDiT) and isinstance(pipe.transformer.model, DiTFast)
    assert pipe.transformer.model.config.numerics == "diffusers"
    after = _images(pipe, guidance_scale)
    diff = (after - before).abs().max().item()
    assert diff <= IMAGE_TOL, f"{scheduler} guidance {guidance_scale}: images differ by {diff:.3g}"
    # the transformer shapes the images: other labels move them far more than the tolerance (the parity is not vacuous)
    assert (_images(pipe, guidance_scale, labels=[5, 6, 7]) - after).abs().max() > max(5 * IMAGE_TOL, 100 * diff)


def test_without_learned_sigma():
    pipe = _pipeline("ddim", learn_sigma=False)
    before = _images(pipe, 4.0)
    after = _images(dit_fast.accelerate(pipe), 4.0)
    assert (after - before).abs().max() <= IMAGE_TOL


def test_interface_the_pipeline_uses():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    transformer = _transformer()
    fast = dit_fast.accelerate(transformer)  # a bare model: the replacement is returned
    assert isinstance(fast, DiffusersDiT)
    assert fast.config.sample_size == 8 and fast.config.in_channels == 4 and fast.config.out_channels == 8
    assert fast.dtype == torch.float32 and fast.device == torch.device("cpu") and not fast.training
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 4, 8, 8, generator=g)
    y = torch.tensor([1, 2, 1000, 999])
    with torch.no_grad():
        for t in (torch.tensor([10, 500, 999, 0]), torch.tensor(321), torch.tensor([321]), 321, 321.0,
                  torch.tensor(321.5, dtype=torch.float64)):
            expected = transformer(x, timestep=broadcast_timesteps(t, 4, x.device), class_labels=y).sample
            out = fast(x, timestep=t, class_labels=y)
            assert isinstance(out, Transformer2DModelOutput)
            torch.testing.assert_close(out.sample, expected, atol=1e-5, rtol=1e-5)
            (plain,) = fast(x, timestep=t, class_labels=y, return_dict=False)
            torch.testing.assert_close(plain, out.sample, atol=0, rtol=0)


def test_bad_inputs_name_the_problem():
    fast = dit_fast.accelerate(_transformer())
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="timestep must be"):
        fast(x, timestep=torch.tensor([1, 2, 3]), class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timestep is required"):
        fast(x, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class_labels is required"):
        fast(x, timestep=5)
    with pytest.raises(ValueError, match="labels must be in"):
        fast(x, timestep=5, class_labels=torch.tensor([1, 1001]))
    with pytest.raises(ValueError, match="cross-attention"):
        fast(x, timestep=5, class_labels=torch.tensor([1, 2]), cross_attention_kwargs={"scale": 1.0})
    with pytest.raises(ValueError, match="cuda_graph=True needs the transformer on a CUDA device"):
        dit_fast.accelerate(_transformer(), cuda_graph=True)
    with pytest.raises(TypeError, match="DiTPipeline or DiTTransformer2DModel"):
        dit_fast.accelerate("pipe")


def test_diverged_embedders_are_refused():
    from diffusers import DiTTransformer2DModel

    fresh = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=8,
                                  out_channels=8)  # each block draws its own embedder copy
    with pytest.raises(CheckpointError, match="embedders differ"):
        dit_fast.accelerate(fresh)


def test_dtype_and_device_moves():
    pipe = _pipeline()
    dit_fast.accelerate(pipe)
    reference = _images(pipe, 4.0)
    pipe.to("cpu", torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.dtype == torch.bfloat16
    assert pipe.transformer.model.pos_embed.dtype == torch.bfloat16
    low = _images(pipe, 4.0)
    assert low.dtype == torch.bfloat16 and (low.float() - reference).abs().max() < 0.1
    pipe.to(torch.float32)  # back, with the bf16-rounded weights
    assert pipe.transformer.dtype == torch.float32 and pipe.transformer.model.pos_embed.dtype == torch.float32
    assert (_images(pipe, 4.0) - reference).abs().max() < 0.1


def test_options_and_reaccelerate():
    pipe = _pipeline()
    before = _images(pipe, 4.0)
    dit_fast.accelerate(pipe, attention="math", kernels="torch")
    assert pipe.transformer.model.attention == "math" and pipe.transformer.model.kernels == "torch"
    fast = pipe.transformer
    dit_fast.accelerate(pipe, attention="sdpa")  # already accelerated: new options, same module
    assert pipe.transformer is fast and fast.model.attention == "sdpa"
    assert (_images(pipe, 4.0) - before).abs().max() <= IMAGE_TOL
    with pytest.raises(ValueError, match="unknown attention backend|valid"):
        dit_fast.accelerate(pipe, attention="nope")
    with pytest.raises(TypeError, match="compile must be"):
        dit_fast.accelerate(pipe, compile="yes")


@pytest.mark.slow
def test_compiled_same_images():
    pipe = _pipeline()
    before = _images(pipe, 4.0, steps=2)
    dit_fast.accelerate(pipe, compile={"dynamic": False})
    assert (_images(pipe, 4.0, steps=2) - before).abs().max() <= IMAGE_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_same_output():
    transformer = _transformer().cuda()
    plain = dit_fast.accelerate(copy.deepcopy(transformer))
    graphed = dit_fast.accelerate(transformer, cuda_graph=True)
    x = torch.randn(4, 4, 8, 8, device="cuda")
    y = torch.tensor([1, 2, 1000, 999], device="cuda")
    with torch.no_grad():
        for t in (torch.tensor([10, 500, 999, 0], device="cuda"), torch.tensor(321, device="cuda")):
            expected = plain(x, timestep=t, class_labels=y).sample
            torch.testing.assert_close(graphed(x, timestep=t, class_labels=y).sample, expected, atol=1e-5, rtol=1e-5)
    assert len(graphed._graphs) == 1  # one input signature, captured once


def test_import_dit_fast_does_not_import_diffusers():
    code = "import sys, dit_fast; assert 'diffusers' not in sys.modules; dit_fast.accelerate; " \
           "assert 'diffusers' not in sys.modules, 'accelerate imported diffusers'"
    subprocess.run([sys.executable, "-c", code], check=True)
