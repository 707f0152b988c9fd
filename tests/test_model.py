"""DiTFast against the reference DiT and the official fixtures: outputs, gradients, state dicts, backends, precision,
compilation, checkpointing and distributed wrappers. Tiny configs throughout (the whole file runs in about a minute on
two cores)."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dit_fast
from dit_fast.kernels import registry as R
from dit_fast.models import attention as A
from dit_fast.models.dit import DiTFast
from dit_fast.reference import DiT
from tests.helpers import assert_close, load_official_fixture, max_rel_err, randomize

L = importlib.import_module("dit_fast.kernels.linear")  # the module, not the op the package exports

TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)
CUDA = torch.cuda.is_available()



def pair(seed: int = 0, **kwargs) -> tuple[DiT, DiTFast]:
    """A randomised reference and a DiTFast holding the same weights (loaded through the state dict)."""
    config = {**TINY, **kwargs}
    fast_only = {k: config.pop(k) for k in ("kernels", "attention", "gradient_checkpointing") if k in config}
    ref = randomize(DiT(**config), seed).eval()
    fast = DiTFast(**config, **fast_only).eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def inputs(model: torch.nn.Module, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, *cfg.grid_input, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    if cfg.class_dropout_prob > 0 and n > 2:
        y[2] = cfg.num_classes  # the null class
    return x, t, y


def close(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    """Equal up to ``tol`` relative to the largest element of ``expected`` (and elementwise rtol ``tol``)."""
    assert_close(actual, expected, atol=tol * float(expected.detach().abs().max()), rtol=tol, name=name)


def check_against_reference(ref: DiT, fast: DiTFast, n: int = 4, tol: float = 1e-5) -> None:
    """forward, forward_with_cfg (both guidance variants) and every parameter gradient, on the models' device."""
    device = next(ref.parameters()).device
    x, t, y = (v.to(device) for v in inputs(ref, n))
    with torch.no_grad():
        close(fast(x, t, y), ref(x, t, y), "forward", tol)
        if n % 2 == 0:
            for guide in (3, "all"):
                close(fast.forward_with_cfg(x, t, y, 4.0, guide), ref.forward_with_cfg(x, t, y, 4.0, guide),
                      f"forward_with_cfg({guide})", tol)
    grad_out = torch.randn(n, ref.out_channels, *ref.config.grid_input, generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.to(device)
    ref.zero_grad()
    fast.zero_grad()
    ref(x, t, y).backward(grad_out)
    fast(x, t, y).backward(grad_out)
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        close(fast_params[name].grad, p.grad, f"grad {name}", tol)


# ---------------------------------------------------------------------------------------------------------------------
# the drop-in contract


def test_exports_and_zoo():
    assert dit_fast.DiTFast is DiTFast
    model = dit_fast.DiT_models["DiT-S/8"](input_size=16, num_classes=10)
    assert isinstance(model, DiTFast)
    assert (model.config.depth, model.config.hidden_size, model.config.patch_size) == (12, 384, 8)
    assert sum(p.numel() for p in model.parameters()) == dit_fast.param_count(model)


@pytest.mark.parametrize("config", [TINY, {**TINY, "input_size": (8, 12), "class_dropout_prob": 0.0},
                                    {**TINY, "numerics": "diffusers", "learn_sigma": False}], ids=str)
def test_same_init_and_state_dict_as_reference(config):
    torch.manual_seed(0)
    ref = DiT(**config)
    torch.manual_seed(0)
    fast = DiTFast(**config)
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(fast_sd) == list(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(fast_sd[key], value), f"{key} differs at init"
    # strict loading both ways, from randomised weights
    randomize(ref)
    fast.load_state_dict(ref.state_dict(), strict=True)
    randomize(fast, seed=3)
    ref.load_state_dict(fast.state_dict(), strict=True)
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in fast.state_dict().items())
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in ref.named_modules()]


def test_from_config_and_unpatchify_match_reference():
    ref, fast = pair(input_size=(8, 12))
    assert DiTFast.from_config(ref.config, attention="math").config == ref.config
    tokens = torch.randn(2, ref.config.num_tokens, 4 * ref.out_channels)
    assert torch.equal(fast.unpatchify(tokens), ref.unpatchify(tokens))


# ---------------------------------------------------------------------------------------------------------------------
# numerics: every CPU backend, odd configs, official fixtures


@pytest.mark.parametrize("kernels,attention", [("torch", "sdpa"), ("torch", "math"), ("triton", "sdpa_flash"),
                                               ("triton", "sdpa_math"), ("auto", "auto")])
def test_matches_reference_for_each_cpu_backend(kernels, attention):
    ref, fast = pair(kernels=kernels, attention=attention)
    check_against_reference(ref, fast)


@pytest.mark.parametrize("config", [
    {"input_size": 16, "patch_size": 4},
    {"input_size": 16, "patch_size": 8},
    {"input_size": (8, 12)},
    {"num_classes": 1},
    {"class_dropout_prob": 0.0},
    {"input_size": 12, "hidden_size": 144, "num_heads": 2},  # head dim 72, as DiT-XL
    {"in_channels": 3, "learn_sigma": False, "mlp_ratio": 2.0},
    {"numerics": "diffusers"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_odd_configs_match_reference(config):
    ref, fast = pair(**config)
    check_against_reference(ref, fast)


def test_batch_of_one():
    ref, fast = pair()
    check_against_reference(ref, fast, n=1)


@pytest.mark.parametrize("prefix", ["tiny", "odd"])
def test_official_fixture(prefix):
    fx = load_official_fixture(prefix)
    sd = {k.removeprefix("state_dict."): v for k, v in fx.items() if k.startswith("state_dict.")}
    cfg = {"tiny": TINY, "odd": dict(input_size=12, patch_size=2, hidden_size=144, depth=2, num_heads=2,
                                     num_classes=10)}[prefix]
    fast = DiTFast(**cfg).eval()
    fast.load_state_dict(sd, strict=True)
    with torch.no_grad():
        close(fast(fx["x"], fx["t"], fx["y"]), fx["forward"], f"{prefix} forward")
        close(fast.forward_with_cfg(fx["cfg_x"], fx["cfg_t"], fx["cfg_y"], 4.0), fx["forward_with_cfg_4.0"],
              f"{prefix} forward_with_cfg")


def test_triton_kernels_in_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref, fast = pair(kernels="triton", depth=1, hidden_size=32, input_size=4)
    check_against_reference(ref, fast, n=2)


def test_training_mode_with_label_dropout_matches_reference():
    ref, fast = pair()
    ref.train()
    fast.train()
    x, t, y = inputs(ref)
    torch.manual_seed(5)
    ref_out = ref(x, t, y)
    torch.manual_seed(5)
    close(fast(x, t, y), ref_out, "train forward")


# ---------------------------------------------------------------------------------------------------------------------
# precision


def test_bf16_weights_within_twice_pytorch_bf16_error():
    ref, fast = pair()
    x, t, y = inputs(ref)
    with torch.no_grad():
        oracle = copy.deepcopy(ref).double()(x.double(), t, y)
        plain = copy.deepcopy(ref).to(torch.bfloat16)(x.bfloat16(), t, y)
        out = fast.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err, plain_err = max_rel_err(out, oracle), max_rel_err(plain, oracle)
    assert err <= 2 * plain_err, f"DiTFast bf16 error {err:.3g} vs reference bf16 {plain_err:.3g}"


def test_bf16_autocast_within_twice_pytorch_autocast_error():
    ref, fast = pair()
    x, t, y = inputs(ref)
    grad_out = torch.randn(4, ref.out_channels, 8, 8)
    oracle = copy.deepcopy(ref).double()(x.double(), t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = ref(x, t, y)
        out = fast(x, t, y)
    assert torch.isfinite(out).all()
    err, plain_err = max_rel_err(out, oracle), max_rel_err(plain, oracle)
    assert err <= 2 * plain_err, f"DiTFast autocast error {err:.3g} vs reference autocast {plain_err:.3g}"
    out.float().backward(grad_out)
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())


class _Casts(TorchDispatchMode):
    """Records the shape of every tensor a dispatched dtype conversion reads (parameters aside)."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params = params
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() not in self.params:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_autocast_runs_no_cast_kernels_around_the_fused_ops(monkeypatch, grad):
    """Under bf16 autocast the fused ops take the fp32 stream with the bf16 modulation and branches as they come: no
    (N, T, D) activation is cast, and silu(c) is cast once (not once per block); the Triton kernels in the
    interpreter. Inference also takes the batched adaLN weight cached in bf16 (no per-forward cast of it)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref, fast = pair(kernels="triton", depth=2, hidden_size=32, input_size=4)
    x, t, y = inputs(ref, n=2)
    params = {p.data_ptr() for p in fast.parameters()} | {b.data_ptr() for b in fast.buffers()}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        fast(x, t, y)  # warm-up: the adaLN cache, autocast's weight-cast cache
        with _Casts(params) as casts:
            out = fast(x, t, y)
    assert not [s for s in casts.shapes if len(s) == 3 and s[-1] == 32], casts.shapes  # no (N, T, D) activation
    assert casts.shapes.count((2, 32)) == 1, casts.shapes  # silu(c), once
    assert (2, 6 * 32, 32) not in casts.shapes  # nor the stacked (depth, 6D, D) adaLN weight
    with torch.no_grad():
        oracle = copy.deepcopy(ref).double()(x.double(), t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = ref(x, t, y)
    assert max_rel_err(out, oracle) <= 2 * max_rel_err(plain, oracle)


# ---------------------------------------------------------------------------------------------------------------------
# the batched adaLN cache


def test_batched_modulation_cache_follows_weight_changes():
    ref, fast = pair()
    x, t, y = inputs(ref)
    with torch.no_grad():
        fast(x, t, y)
        assert "adaln" in fast._stack_cache, "inference should use the batched adaLN GEMM"
        # an in-place update of one block's adaLN weight (as an optimizer or EMA step does)
        for model in (ref, fast):
            model.blocks[1].adaLN_modulation[1].weight.mul_(-0.5)
        close(fast(x, t, y), ref(x, t, y), "after an in-place update")
    # an optimizer step on both
    for model in (ref, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x, t, y).square().mean().backward()
        opt.step()
    with torch.no_grad():
        close(fast(x, t, y), ref(x, t, y), "after an optimizer step")
        # load_state_dict and .to() replace or rewrite the weights
        randomize(ref, seed=7)
        fast.load_state_dict(ref.state_dict())
        close(fast(x, t, y), ref(x, t, y), "after load_state_dict")
        fast.to(torch.float32)
        close(fast(x, t, y), ref(x, t, y), "after .to()")


def test_training_computes_modulation_per_block():
    _, fast = pair()
    x, t, y = inputs(fast)
    fast(x, t, y).sum().backward()
    assert "adaln" not in fast._stack_cache
    assert all(b.adaLN_modulation[1].weight.grad.abs().sum() > 0 for b in fast.blocks)


@pytest.mark.skipif(not L._ONEDNN, reason="PyTorch built without oneDNN")
def test_cpu_linears_run_through_onednn(monkeypatch):
    calls: list[bool] = []
    real = L.onednn_linear
    monkeypatch.setattr(L, "onednn_linear", lambda x, w, b, gelu: calls.append(gelu) or real(x, w, b, gelu))
    ref, fast = pair()
    x, t, y = inputs(ref)
    with torch.no_grad():
        close(fast(x, t, y), ref(x, t, y), "oneDNN forward")
    depth = ref.config.depth
    assert len(calls) == 4 * depth + 2 and sum(calls) == depth  # qkv, proj, fc1 (+GELU), fc2 per block; patch, final
    calls.clear()
    fast(x, t, y).sum().backward()  # with gradients: the same GEMMs, GELU applied separately
    assert len(calls) >= 4 * depth + 1 and not any(calls)
    calls.clear()
    fast.set_kernels("torch")  # plain PyTorch: F.linear + F.gelu, no oneDNN call
    with torch.no_grad():
        close(fast(x, t, y), ref(x, t, y), "kernels='torch' forward")
    assert calls == []


@pytest.mark.skipif(not L._ONEDNN, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_gradients(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, generator=g).transpose(1, 2).requires_grad_(True)  # (2, 5, 8), non-contiguous
    w = torch.randn(3, 8, generator=g).requires_grad_(True)
    b = torch.randn(3, generator=g).requires_grad_(True) if bias else None
    grad = torch.randn(2, 5, 3, generator=g)
    out = L.onednn_linear(x, w, b, False)
    expected = F.linear(x, w, b)
    close(out, expected, "onednn_linear")
    got = torch.autograd.grad(out, [x, w] + ([b] if bias else []), grad)
    want = torch.autograd.grad(expected, [x, w] + ([b] if bias else []), grad)
    for name, a, e in zip(("x", "weight", "bias"), got, want, strict=False):
        close(a, e, f"grad {name}")
    with pytest.raises(RuntimeError, match="fused GELU is inference-only"):
        L.onednn_linear(x, w, b, True).sum().backward()


# ---------------------------------------------------------------------------------------------------------------------
# training features


def test_gradient_checkpointing_gives_the_same_gradients():
    ref, fast = pair()
    _, ckpt = pair(gradient_checkpointing=True)
    assert ckpt.gradient_checkpointing
    x, t, y = inputs(ref)
    fast(x, t, y).square().sum().backward()
    ckpt(x, t, y).square().sum().backward()
    grads = dict(fast.named_parameters())
    for name, p in ckpt.named_parameters():
        close(p.grad, grads[name].grad, f"checkpointed grad {name}", 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and under autocast
        ckpt(x, t, y).float().square().sum().backward()


# FSDP2 warns about any view among a block's outputs (F.linear returns one); nothing here modifies them in place
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module.*returned a view tensor")
def test_ddp_and_fsdp_wrappers(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ref, fast = pair(gradient_checkpointing=True)
        x, t, y = inputs(ref)
        ref(x, t, y).square().mean().backward()
        ddp = DistributedDataParallel(fast)
        ddp(x, t, y).square().mean().backward()
        grads = dict(fast.named_parameters())
        for name, p in ref.named_parameters():
            close(grads[name].grad, p.grad, f"DDP grad {name}")

        _, sharded = pair(gradient_checkpointing=True)
        for block in sharded.blocks:
            fully_shard(block)
        fully_shard(sharded)
        sharded(x, t, y).square().mean().backward()
        for name, p in sharded.named_parameters():
            close(p.grad.full_tensor(), dict(ref.named_parameters())[name].grad, f"FSDP grad {name}")
        with torch.no_grad():  # inference with sharded blocks falls back to per-block modulation
            close(sharded(x, t, y), ref(x, t, y), "FSDP forward")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile: one inductor compilation in the suite (C++ codegen is slow on two cores), one traced-only


def test_whole_model_compile_fullgraph_matches_eager():
    """Inductor on the whole inference forward: no graph break anywhere, same numbers."""
    ref, fast = pair()
    x, t, y = inputs(ref)
    compiled = torch.compile(fast, fullgraph=True, dynamic=False)
    with torch.no_grad():
        close(compiled(x, t, y), ref(x, t, y), "compiled forward")


def test_regional_compile_training_matches_eager():
    """The block graphs (with and without a pending residual, forward and backward) trace with fullgraph=True;
    aot_eager runs them through AOTAutograd without inductor's codegen to keep the suite fast."""
    ref, fast = pair()
    fast.compile(regional=True, backend="aot_eager")
    check_against_reference(ref, fast, n=2)


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_bad_backend_names_and_missing_packages(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        DiTFast(**TINY, attention="flash")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'; valid names: auto, triton, onednn, torch"):
        DiTFast(**TINY, kernels="cuda")
    monkeypatch.setitem(A._OPTIONAL, "flash_attn", None)
    with pytest.raises(ImportError, match=r"pip install dit-fast\[flash\]"):
        DiTFast(**TINY, attention="flash_attn")
    monkeypatch.setattr(R, "_triton_installed", lambda: False)
    with pytest.raises(ImportError, match=r"pip install dit-fast\[triton\]"):
        DiTFast(**TINY, kernels="triton")


def test_kernels_environment_default(monkeypatch):
    monkeypatch.setattr(R, "_warned", set())
    monkeypatch.setenv(R.ENV_VAR, "triton")
    assert R.resolve_kernels("auto", "cpu") == ("triton" if R._triton_installed() else "onednn")
    assert R.resolve_kernels("torch", "cpu") == "torch"
    monkeypatch.setenv(R.ENV_VAR, "bogus")
    with pytest.warns(UserWarning, match="DIT_FAST_KERNELS=bogus is not usable"):
        assert R.resolve_kernels("auto", "cpu") == ("onednn" if L._ONEDNN else "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.resolve_kernels("auto", "cpu")


def test_bad_inputs_raise():
    _, fast = pair()
    x, t, y = inputs(fast)
    with pytest.raises(ValueError, match="x is 8x10, the model was built for input_size"):
        fast(F.pad(x, (0, 2)), t, y)
    with pytest.raises(ValueError, match="labels must be in"):
        fast(x, t, y + 20)
    with pytest.raises(ValueError, match="forward_with_cfg needs an even batch"):
        fast.forward_with_cfg(x[:3], t[:3], y[:3], 4.0)


# ---------------------------------------------------------------------------------------------------------------------
# CUDA (skipped on CPU)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_kernels_match_reference(dtype):
    ref, fast = pair(kernels="triton", input_size=12, hidden_size=144, num_heads=2)
    ref, fast = ref.cuda(), fast.cuda()
    x, t, y = (v.cuda() for v in inputs(ref))
    with torch.no_grad():
        oracle = copy.deepcopy(ref).double()(x.double(), t, y)
        plain = copy.deepcopy(ref).to(dtype)(x.to(dtype), t, y)
        out = copy.deepcopy(fast).to(dtype)(x.to(dtype), t, y)
    bound = 2 * max_rel_err(plain, oracle) + (1e-5 if dtype == torch.float32 else 0)
    assert max_rel_err(out, oracle) <= bound
    check_against_reference(ref, fast)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_matches_eager():
    ref, fast = pair()
    ref, fast = ref.cuda(), fast.cuda()
    x, t, y = (v.cuda() for v in inputs(ref))
    run = fast.cuda_graph(x, t, y)
    run_cfg = fast.cuda_graph(x, t, y, cfg_scale=4.0)
    with torch.no_grad():
        for seed in range(2):
            x2, t2, y2 = (v.cuda() for v in inputs(ref, seed=seed + 1))
            close(run(x2, t2, y2), ref(x2, t2, y2), "graph replay")
            close(run_cfg(x2, t2, y2), ref.forward_with_cfg(x2, t2, y2, 4.0), "graph replay cfg")
