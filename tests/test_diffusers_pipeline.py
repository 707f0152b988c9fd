"""``dit_fast.accelerate(pipe)``: random diffusers ``DiTPipeline``s give the same images after acceleration, and the
pipeline contract holds.

Pipelines: random ``DiTTransformer2DModel``s with distinct per-block embedder copies (as diffusers builds them; so
per-block conditioning), several sizes, patch 2 and 4, learned sigma and not, and a small random ``AutoencoderKL``;
DDIM and DPM-Solver with guidance (the batch doubled, the null class 1000). fp32 images must agree to 1e-4 of the
image range [0, 1]. Then persistence (saving writes a stock diffusers folder, loaded here and in a process that
cannot import dit_fast), ``pipe.to``, ``components``, offload hooks, progress bars, outputs, per-seed images,
config fields, diffusers' switches and step caching.
"""

import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import dit_fast
from dit_fast.models import dit as dit_module
from dit_fast.models.dit import DiTFast
from dit_fast.sampling import diffusers_model as DM
from dit_fast.sampling.diffusers_model import DiffusersDiT, broadcast_timesteps

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                reason="diffusers is not installed (pip install 'dit-fast[diffusers]')")

IMAGE_TOL = 1e-4  # of the image range [0, 1]
LABELS = [3, 999, 0]
# (heads, head dim, blocks, latent side, patch, learned sigma)
SIZES = {"h64-2L-p2-sigma": (2, 32, 2, 8, 2, True), "h48-3L-p4": (3, 16, 3, 8, 4, False),
         "h96-2L-p2-12px-sigma": (4, 24, 2, 12, 2, True)}


def _transformer(size: str = "h64-2L-p2-sigma", distinct: bool = True, seed: int = 0) -> torch.nn.Module:
    """A random DiT, every weight random (no zero adaLN init, so any mapping error shows); ``distinct=False`` copies
    block 0's embedders into every block, as converted official checkpoints have them."""
    from diffusers import DiTTransformer2DModel

    heads, dim, layers, side, patch, sigma = SIZES[size]
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=dim, in_channels=4,
                                  out_channels=8 if sigma else 4, num_layers=layers, sample_size=side,
                                  patch_size=patch, num_embeds_ada_norm=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
        if not distinct:
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


def _pipeline(scheduler: str = "ddim", size: str = "h64-2L-p2-sigma", distinct: bool = True):
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=_transformer(size, distinct), vae=_vae(), scheduler=_scheduler(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, guidance_scale: float = 4.0, steps: int = 4, labels: list[int] = LABELS, seed: int = 0,
            **kwargs) -> torch.Tensor:
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    out = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps, generator=generator,
               output_type="pt", **kwargs)
    return out.images  # (N, 3, H, W) in [0, 1]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# same images: every DiTTransformer2DModel, DDIM and DPM-Solver, guided


@pytest.mark.parametrize("scheduler, size", [("ddim", "h64-2L-p2-sigma"), ("dpm", "h64-2L-p2-sigma"),
                                             ("dpm", "h48-3L-p4"), ("ddim", "h96-2L-p2-12px-sigma")])
def test_same_images_per_block_embedders(scheduler, size):
    pipe = _pipeline(scheduler, size)
    before = _images(pipe)
    assert dit_fast.accelerate(pipe) is pipe
    fast = pipe.transformer
    assert isinstance(fast, DiffusersDiT) and isinstance(fast.model, DiTFast)
    assert fast.model.config.numerics == "diffusers" and fast.model.config.per_block_conditioning
    after = _images(pipe)
    diff = _max_diff(after, before)
    assert diff <= IMAGE_TOL, f"{scheduler} {size}: images differ by {diff:.3g}"
    # the transformer shapes the images: other labels move them far more than the tolerance (the parity is not vacuous)
    assert _max_diff(_images(pipe, labels=[5, 6, 7]), after) > max(50 * IMAGE_TOL, 100 * diff)


def test_unguided_and_shared_embedders():
    pipe = _pipeline("ddim", distinct=False)
    before = _images(pipe, guidance_scale=1.0)
    dit_fast.accelerate(pipe)
    assert not pipe.transformer.model.config.per_block_conditioning  # identical copies: the shared pair
    assert _max_diff(_images(pipe, guidance_scale=1.0), before) <= IMAGE_TOL


@pytest.mark.parametrize("distinct", [True, False])
def test_conversion_round_trips_the_tensors(distinct):
    transformer = _transformer("h48-3L-p4", distinct)
    back = dit_fast.accelerate(transformer).to_diffusers()
    public = lambda config: {k: v for k, v in config.items() if k[0] != "_"}  # noqa: E731
    assert type(back) is type(transformer) and public(back.config) == public(transformer.config)
    original, returned = transformer.state_dict(), back.state_dict()
    assert returned.keys() == original.keys() and all(torch.equal(returned[k], original[k]) for k in original)
    assert torch.equal(back.pos_embed.pos_embed, transformer.pos_embed.pos_embed)  # diffusers' non-persistent table


# ---------------------------------------------------------------------------------------------------------------------
# persistence in diffusers' own format


@pytest.mark.parametrize("save, load", [
    ({}, {}),
    ({"variant": "bf16"}, {"variant": "bf16", "torch_dtype": torch.bfloat16}),
    ({"safe_serialization": False}, {"torch_dtype": {"transformer": torch.float32, "default": torch.float32}}),
    ({"max_shard_size": "60KB"}, {}),
])
def test_save_load_round_trip(tmp_path, save, load):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    pipe = _pipeline()
    dit_fast.accelerate(pipe)
    dtype = load.get("torch_dtype", torch.float32)
    pipe.to(dtype if isinstance(dtype, torch.dtype) else torch.float32)
    expected = _images(pipe, steps=2)
    pipe.save_pretrained(tmp_path, **save)
    assert json.loads((tmp_path / "model_index.json").read_text())["transformer"] == ["diffusers",
                                                                                      "DiTTransformer2DModel"]
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel"
    loaded = DiTPipeline.from_pretrained(tmp_path, **load)
    assert type(loaded.transformer) is DiTTransformer2DModel
    saved = pipe.transformer.to_diffusers().state_dict()
    assert all(torch.equal(loaded.transformer.state_dict()[k], v) for k, v in saved.items())
    loaded.set_progress_bar_config(disable=True)
    dit_fast.accelerate(loaded)
    assert loaded.transformer.model.config == pipe.transformer.model.config
    assert torch.equal(_images(loaded, steps=2), expected)


def test_stock_diffusers_loads_the_folder_without_dit_fast(tmp_path):
    pipe = _pipeline()
    dit_fast.accelerate(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    expected = _images(pipe, steps=2)
    code = (  # -I: no PYTHONPATH, no current directory; sys.modules["dit_fast"] = None: even an installed one fails
        "import sys; sys.modules['dit_fast'] = None\n"
        "import torch\nfrom diffusers import DiTPipeline\n"
        f"pipe = DiTPipeline.from_pretrained({str(tmp_path / 'pipe')!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        f"images = pipe(class_labels={LABELS}, guidance_scale=4.0, num_inference_steps=2, "
        "generator=torch.Generator().manual_seed(0), output_type='pt').images\n"
        f"torch.save(images, {str(tmp_path / 'images.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, cwd=tmp_path)
    assert _max_diff(torch.load(tmp_path / "images.pt"), expected) <= IMAGE_TOL


def test_device_map_then_accelerate(tmp_path):
    pytest.importorskip("accelerate", reason="device_map needs the accelerate package")
    from diffusers import DiTPipeline

    _pipeline().save_pretrained(tmp_path)
    plain = DiTPipeline.from_pretrained(tmp_path)
    plain.set_progress_bar_config(disable=True)
    expected = _images(plain, steps=2)
    mapped = DiTPipeline.from_pretrained(tmp_path, device_map="cpu")
    mapped.set_progress_bar_config(disable=True)
    dit_fast.accelerate(mapped)
    assert _max_diff(_images(mapped, steps=2), expected) <= IMAGE_TOL


# ---------------------------------------------------------------------------------------------------------------------
# the rest of the pipeline contract


def test_components_stay_truthful_and_the_old_transformer_is_untouched():
    pipe = _pipeline()
    old = pipe.components["transformer"]
    old_state = {k: v.clone() for k, v in old.state_dict().items()}
    dit_fast.accelerate(pipe)
    assert pipe.components["transformer"] is pipe.transformer and isinstance(pipe.transformer, DiffusersDiT)
    assert pipe.config.transformer == ("diffusers", "DiTTransformer2DModel")
    new_storage = {p.untyped_storage().data_ptr() for p in pipe.transformer.parameters()}
    assert not new_storage & {p.untyped_storage().data_ptr() for p in old.parameters()}
    pipe.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.components["transformer"].dtype == torch.bfloat16
    assert old.dtype == torch.float32 and all(torch.equal(old.state_dict()[k], v) for k, v in old_state.items())


def test_dtype_moves_cast_once_and_never_autocast(monkeypatch):
    pipe = _pipeline()
    dit_fast.accelerate(pipe)
    reference = _images(pipe)
    casts = []
    real_cast = DM.cast_for_inference
    monkeypatch.setattr(DM, "cast_for_inference", lambda model, dtype: casts.append(dtype) or real_cast(model, dtype))
    autocast_seen = []
    pipe.transformer.register_forward_pre_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    pipe.to("cpu", torch.bfloat16)
    assert casts == [torch.bfloat16] and pipe.transformer.model.pos_embed.dtype == torch.bfloat16
    low = _images(pipe)
    assert casts == [torch.bfloat16] and autocast_seen and not any(autocast_seen)
    assert low.dtype == torch.bfloat16 and _max_diff(low, reference) < 0.1
    pipe.to(torch.float32)  # back, with the bf16-rounded weights
    assert pipe.transformer.dtype == torch.float32 and pipe.transformer.model.pos_embed.dtype == torch.float32
    assert _max_diff(_images(pipe), reference) < 0.1


def _without_bf16_gemm(monkeypatch) -> None:
    """Take the routes of a CPU with no bf16/fp16 GEMM (AVX2 only): bf16 weights, fp32 activations, fp32 GEMMs."""
    linear_module = sys.modules["dit_fast.kernels.linear"]
    real = linear_module.cpu_linear_route
    route = lambda dtype: "onednn-fp32" if dtype in (torch.bfloat16, torch.float16) else real(dtype)  # noqa: E731
    monkeypatch.setattr(linear_module, "cpu_linear_route", route)
    monkeypatch.setattr(dit_module, "cpu_linear_route", route)


@pytest.mark.parametrize("gemm", ["this-cpu", "no-bf16-gemm"])
@pytest.mark.parametrize("size", ["h64-2L-p2-sigma", "h96-2L-p2-12px-sigma"])
def test_bf16_pipeline_takes_dit_fast_bf16_path(monkeypatch, size, gemm):
    """``pipe.to(torch.bfloat16)``: DiTFast's bf16 path (``set_precision``: fp32 residual stream, and fp32
    activations where the CPU has no bf16 GEMM), whose images are no further from diffusers' fp32 images than
    diffusers' own bf16 images are (a bf16 residual stream, the plain ``.to``, is not: 0.052 vs 0.048 and 0.081 vs
    0.076 here); the train/eval mode and ``requires_grad`` are left alone."""
    if gemm == "no-bf16-gemm":
        _without_bf16_gemm(monkeypatch)
    pipe = _pipeline("ddim", size)
    exact = _images(pipe)
    diffusers_err = _max_diff(_images(copy.deepcopy(pipe).to(torch.bfloat16)), exact)
    dit_fast.accelerate(pipe)
    fast, model = pipe.transformer, pipe.transformer.model
    fast.train()  # as a user who fine-tunes after casting has it
    pipe.to(torch.bfloat16)
    assert fast.training and all(p.requires_grad and p.dtype == torch.bfloat16 for p in fast.parameters())
    widened = dit_module.cpu_linear_route(torch.bfloat16) == "onednn-fp32"
    assert model.residual_dtype == torch.float32 and model.activation_dtype == (torch.float32 if widened else None)
    side = fast.config.sample_size
    x, t, y = torch.randn(2, 4, side, side).bfloat16(), torch.tensor([3, 700]), torch.tensor([1, 2])
    fast(x, timestep=t, class_labels=y).sample.float().square().sum().backward()  # trains in bf16
    assert all(p.grad is not None for p in fast.parameters())
    fast.eval()
    low = _images(pipe)
    assert low.dtype == torch.bfloat16  # the transformer returns bf16 (fp32 activations or not)
    err = _max_diff(low, exact)
    assert err <= diffusers_err, f"bf16 images differ from fp32 by {err:.3g}, diffusers' by {diffusers_err:.3g}"


def test_back_to_fp32_restores_the_fp32_path(monkeypatch):
    """bf16 then ``pipe.to(torch.float32)``: the fp32 path again (residual and activation dtypes reset), the images
    of diffusers' own pipeline after the same two casts (fp32 parity); a device move re-derives the settings."""
    _without_bf16_gemm(monkeypatch)
    pipe = _pipeline()
    expected = _images(copy.deepcopy(pipe).to(torch.bfloat16).to(torch.float32))  # bf16-rounded weights, fp32
    dit_fast.accelerate(pipe)
    model = pipe.transformer.model
    pipe.to(torch.bfloat16)
    model.activation_dtype = None  # as if set on another device: a move to this one sets it for this one
    pipe.to("cpu")
    assert model.activation_dtype == torch.float32 and pipe.transformer.dtype == torch.bfloat16
    pipe.to(torch.float32)
    assert model.residual_dtype is None and model.activation_dtype is None and pipe.transformer.dtype == torch.float32
    assert _max_diff(_images(pipe), expected) <= IMAGE_TOL
    pipe.transformer._graphs = object()  # as if CUDA graphs had been captured on the fp32 weights
    pipe.transformer.to(torch.bfloat16)  # a dtype-only cast (no _apply of the adapter itself)
    assert pipe.transformer._graphs is None  # dropped: recaptured on the new weights


def test_reference_dit_behind_the_adapter_is_cast_as_it_is():
    from dit_fast.reference import DiT

    transformer = _transformer()
    config = dit_fast.accelerate(copy.deepcopy(transformer)).model.config
    plain = DiT.from_config(config)
    plain.load_state_dict(dit_fast.accelerate(copy.deepcopy(transformer)).model.state_dict())
    fast = DiffusersDiT(plain.eval(), transformer.config).to(torch.bfloat16)
    assert fast.model is plain and all(p.dtype == torch.bfloat16 for p in plain.parameters())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        low = fast(x.bfloat16(), timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 2])).sample
        full = transformer(x, timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 2])).sample
    assert low.dtype == torch.bfloat16 and _max_diff(low, full) < 0.1


def test_outputs_progress_bar_and_per_seed_images(capsys):
    pipe = _pipeline()
    dit_fast.accelerate(pipe)
    pipe.set_progress_bar_config(desc="denoising-dit", disable=False)
    (images,) = pipe(class_labels=LABELS, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                     output_type="pt", return_dict=False)
    assert "denoising-dit" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(images, _images(pipe, steps=3))
    assert "denoising-dit" not in capsys.readouterr().err
    for cache in (None, "fora:2"):  # one generator per image: its image does not depend on the rest of the batch
        dit_fast.accelerate(pipe, cache=cache)
        alone = _images(pipe, steps=2, labels=[3], generator=[torch.Generator().manual_seed(7)])
        batch = _images(pipe, steps=2, labels=[5, 3, 8],
                        generator=[torch.Generator().manual_seed(s) for s in (1, 7, 2)])
        assert _max_diff(batch[1:2], alone) <= IMAGE_TOL


def test_interface_and_config_fields():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    transformer = _transformer()
    fast = dit_fast.accelerate(transformer)  # a bare model: the replacement is returned
    assert isinstance(fast, DiffusersDiT)
    assert {k: v for k, v in fast.config.items() if k[0] != "_"} == \
        {k: v for k, v in transformer.config.items() if k[0] != "_"}
    assert (fast.config.sample_size, fast.config.in_channels, fast.config.out_channels, fast.config.patch_size,
            fast.config.num_embeds_ada_norm) == (8, 4, 8, 2, 1000)
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
    with pytest.raises(ValueError, match="cannot be combined with compile"):
        dit_fast.accelerate(_transformer(), cache="fora:2", compile=True)
    with pytest.raises(ValueError, match="unknown cache policy"):
        dit_fast.accelerate(_transformer(), cache="sometimes")


def test_diffusers_switches_are_honoured_or_refused():
    transformer = _transformer()
    fast = dit_fast.accelerate(copy.deepcopy(transformer)).train()
    fast.enable_gradient_checkpointing()
    assert fast.is_gradient_checkpointing and fast.model.gradient_checkpointing
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    fast(x, timestep=t, class_labels=y).sample.square().sum().backward()
    checkpointed = [p.grad.clone() for p in fast.parameters()]
    fast.zero_grad()
    fast.disable_gradient_checkpointing()
    fast(x, timestep=t, class_labels=y).sample.square().sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(checkpointed, fast.parameters(), strict=True))
    fast.set_attention_backend("math")
    assert fast.model.attention == "math"
    fast.reset_attention_backend()
    assert fast.model.attention == "auto"
    refused = {
        "gradient_checkpointing_func": lambda: fast.enable_gradient_checkpointing(torch.utils.checkpoint.checkpoint),
        "NPU flash attention": fast.enable_npu_flash_attention,
        "XLA flash attention": fast.enable_xla_flash_attention,
        "layerwise casting": fast.enable_layerwise_casting,
        "group offload|_supports_group_offloading": lambda: fast.enable_group_offload(torch.device("cpu")),
        "diffusers' 'flash'": lambda: fast.set_attention_backend("flash"),
        "attention_op": lambda: fast.enable_xformers_memory_efficient_attention(attention_op=object()),
        "context parallelism": lambda: fast.enable_parallelism(config=None),
    }
    for name, call in refused.items():
        with pytest.raises((NotImplementedError, ValueError), match=name):
            call()


def test_model_cpu_offload_hooks():
    pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs the accelerate package")
    pipe = _pipeline()
    dit_fast.accelerate(pipe)
    expected = _images(pipe, steps=2)
    pipe.enable_model_cpu_offload(device="cpu")
    assert type(pipe.transformer._hf_hook).__name__ == "CpuOffload"  # accelerate's hook on the DiffusersDiT
    assert _max_diff(_images(pipe, steps=2), expected) <= IMAGE_TOL


# ---------------------------------------------------------------------------------------------------------------------
# step caching through the pipeline


def test_step_cache_over_each_pipeline_call():
    pipe = _pipeline()
    plain = _images(dit_fast.accelerate(pipe), steps=6)
    dit_fast.accelerate(pipe, cache="fora:2")
    for _ in range(2):  # each call is its own run: the cache starts over
        cached = _images(pipe, steps=6)
        stats = pipe.transformer.step_cache
        assert (stats.full_steps, stats.cached_steps) == (3, 3)
    assert 0 < _max_diff(cached, plain) < 0.2
    dit_fast.accelerate(pipe, cache="auto")
    _images(pipe, steps=4)
    assert pipe.transformer.step_cache.policy == dit_fast.cache.parse_cache("auto", 4)
    pipe.scheduler.set_timesteps(50)
    assert pipe.transformer._num_steps() == 50  # "auto" reads the scheduler's steps at each run's start
    dit_fast.accelerate(pipe, cache=None)
    assert pipe.transformer.step_cache is None and torch.equal(_images(pipe, steps=6), plain)


@pytest.mark.slow
def test_compiled_same_images():
    pipe = _pipeline()
    before = _images(pipe, steps=2)
    dit_fast.accelerate(pipe, compile={"dynamic": False})
    assert _max_diff(_images(pipe, steps=2), before) <= IMAGE_TOL


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
    assert len(graphed._graphs.graphs) == 1  # one input signature, captured once


def test_import_dit_fast_does_not_import_diffusers():
    code = "import sys, dit_fast; assert 'diffusers' not in sys.modules; dit_fast.accelerate; " \
           "assert 'diffusers' in sys.modules  # dit_fast.accelerate serves diffusers pipelines: it imports diffusers"
    subprocess.run([sys.executable, "-c", code], check=True)
