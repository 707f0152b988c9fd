"""Step caching (dit_fast.cache): bit-identical when off, each policy's schedule and forecast, every sampler,
guidance (with an interval), DiTFast and the reference, spec parsing and errors."""

from __future__ import annotations

import pytest
import torch

from dit_fast.cache import (
    AUTO_SPEC,
    AUTO_SPEC_FEW_STEPS,
    Adaptive,
    FixedPeriod,
    StepCache,
    TaylorForecast,
    parse_cache,
    step_cache,
)
from dit_fast.diffusion import CFGModel
from dit_fast.models.dit import DiTFast
from dit_fast.reference import DiT
from dit_fast.sampling.generate import generate, sample_batch
from tests.helpers import max_rel_err, tiny_dit


def _pair(depth: int = 2) -> tuple[DiT, DiTFast]:
    ref = tiny_dit(depth, scale=0.05)
    fast = DiTFast.from_config(ref.config)
    fast.load_state_dict(ref.state_dict())
    return ref, fast.eval()


REF, FAST = _pair()
LABELS = torch.tensor([0, 3, 7, 9, 1])


def _sample(model, sampler="ddim", steps=12, cfg=1.0, cache=None, stats=None, **kw):
    return generate(model, LABELS, sampler=sampler, num_steps=steps, cfg_scale=cfg, seed=1, progress=False,
                    guide_channels="all", cache=cache, cache_stats=stats, **kw)


@pytest.mark.parametrize("model", [REF, FAST], ids=["reference", "dit_fast"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_off_is_bit_identical_and_policies_stay_close(model, sampler, cfg):
    base = _sample(model, sampler, cfg=cfg)
    assert torch.equal(_sample(model, sampler, cfg=cfg, cache="none"), base)
    assert torch.equal(_sample(model, sampler, cfg=cfg, cache=None), base)
    assert torch.equal(_sample(model, sampler, cfg=cfg, cache="fora:1"), base)  # every step a full step
    for spec in ("fora:2", "taylor:3:1", "taylor:3:2", "adaptive:0.05"):
        stats: dict[str, int] = {}
        out = _sample(model, sampler, cfg=cfg, cache=spec, stats=stats)
        assert stats["full_steps"] + stats["cached_steps"] == 12
        assert stats["cached_steps"] > 0, spec
        assert 0 < max_rel_err(out, base) < 0.05, spec  # approximate, not wildly off


def test_reference_and_dit_fast_cache_the_same_way():
    for spec in ("fora:3", "taylor:4:2", "adaptive:0.05"):
        ref, fast = _sample(REF, cache=spec), _sample(FAST, cache=spec)
        assert max_rel_err(fast, ref) < 1e-5, spec


def test_fixed_interval_schedule_and_reuse_of_branch_outputs():
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([900, 900, 900])
    y = torch.tensor([1, 2, 3])
    with torch.no_grad(), step_cache(REF, "fora:3") as cache:
        outs = [REF(x, t - 10 * k, y) for k in range(7)]
    assert cache.decisions == [True, False, False, True, False, False, True]
    # a cached step reuses every branch output: it equals a forward whose branches return the full step's outputs
    branches = [m for b in REF.blocks for m in (b.attn, b.mlp)]
    recorded = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: recorded.append(o)) for m in branches]
    with torch.no_grad():
        REF(x, t, y)
    for h in hooks:
        h.remove()
    replay = iter(recorded)
    hooks = [m.register_forward_hook(lambda _m, _i, _o: next(replay)) for m in branches]
    with torch.no_grad():
        expected = REF(x, t - 10, y)
    for h in hooks:
        h.remove()
    assert torch.equal(outs[1], expected)
    assert not any("forward" in m.__dict__ for m in branches)  # removed on exit


def test_taylor_forecast_is_exact_for_polynomial_features():
    """Branch outputs that are linear (order 1) or quadratic (order 2) in the step are forecast exactly."""
    cache = StepCache(REF, TaylorForecast(2, 2))
    base, slope, curve = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    truth = [base + slope * s + curve * s * s for s in range(12)]
    probe = torch.zeros(1, 2, 2)
    for s in range(12):
        cache._begin_step(probe)
        if cache._full:
            cache._record(0, truth[s])
        elif s >= 5:  # three full steps (0, 2, 4) recorded: second order available
            torch.testing.assert_close(cache._predict(0), truth[s], atol=1e-4, rtol=1e-5)
    linear = StepCache(REF, TaylorForecast(3, 1))
    for s in range(9):
        linear._begin_step(probe)
        if linear._full:
            linear._record(0, base + slope * s)
        elif s > 3:
            torch.testing.assert_close(linear._predict(0), base + slope * s, atol=1e-5, rtol=1e-5)


def test_adaptive_follows_the_probe_change():
    cache = StepCache(REF, Adaptive(0.1, max_reuse=3))
    probe = torch.ones(2, 4, 8)
    for scale in (1.0, 1.05, 1.09, 1.2, 1.25, 1.26, 1.27, 1.28):
        cache._begin_step(probe * scale)
        if cache._full:
            cache._record(0, probe)
    # 1.0 full; 1.05, 1.09 within 10%; 1.2 full; 1.25, 1.26, 1.27 within 10% of 1.2 (3 = max_reuse); 1.28 full
    assert cache.decisions == [True, False, False, True, False, False, False, True]


def test_guidance_caches_per_half_and_interval_restarts():
    """Rows are independent: a cached guided sample equals the first rows of a bigger batch's; with a guidance
    interval the batch layout changes and the cache restarts with a full step."""
    model = REF
    noise = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([1, 2, 3, 4])
    kw = {"sampler": "ddim", "num_steps": 10, "cfg_scale": 2.5, "null_class": 10, "guide_channels": "all"}
    with torch.no_grad():
        whole = sample_batch(model, noise, labels, cache="taylor:3:1", **kw)
        part = sample_batch(model, noise[:2], labels[:2], cache="taylor:3:1", **kw)
    torch.testing.assert_close(part, whole[:2], atol=1e-6, rtol=1e-5)
    # DDIM-10 visits original steps 999, 888, ..., 0; guidance on 400..700 covers three of them (666, 555, 444)
    sizes = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    stats: dict[str, int] = {}
    with torch.no_grad():
        sample_batch(model, noise, labels, cache="fora:4", interval=(400, 700), cache_stats=stats, **kw)
    hook.remove()
    assert sizes == [4, 4, 4, 8, 8, 8, 4, 4, 4, 4]
    assert stats["full_steps"] == 3  # the first step and the two layout changes (to 8 rows and back to 4)


def test_any_batch_size_and_dit_fast_guided_path():
    for n in (1, 3):
        out = generate(FAST, LABELS[:n], sampler="dpm++", num_steps=6, cfg_scale=3.0, cache="fora:2", progress=False)
        assert out.shape == (n, 1, 8, 8) and torch.isfinite(out).all()


def test_parse_cache():
    assert parse_cache("none") is None and parse_cache(None) is None
    assert parse_cache("auto") == parse_cache("auto", 250) == parse_cache(AUTO_SPEC)
    assert parse_cache("auto", 20) == parse_cache(AUTO_SPEC_FEW_STEPS)
    assert parse_cache("fora:3") == FixedPeriod(3)
    assert parse_cache("taylor:4:2") == TaylorForecast(4, 2)
    assert parse_cache("taylor:4") == TaylorForecast(4, 1)
    assert parse_cache("adaptive:0.05") == Adaptive(0.05)
    assert parse_cache("adaptive:0.05:6") == Adaptive(0.05, 6)
    for policy in (FixedPeriod(3), TaylorForecast(4, 2), Adaptive(0.05, 6)):
        assert parse_cache(policy.spec) == policy
    for bad, message in (("fora", "takes 1"), ("fora:x", "integer"), ("fora:0", ">= 1"), ("taylor:4:3", "order"),
                         ("adaptive:-1", ">= 0"), ("lru:3", "unknown cache policy"), ("fora:1:2:3", "takes")):
        with pytest.raises(ValueError, match=message):
            parse_cache(bad)


def test_bad_models():
    with pytest.raises(TypeError, match="needs a DiT"):
        with step_cache(torch.nn.Linear(2, 2), "fora:2"):
            pass
    import copy

    compiled = copy.deepcopy(FAST)
    compiled.blocks[0].compile()
    with pytest.raises(ValueError, match="compiled"):
        with step_cache(compiled, "fora:2"):
            pass


def test_cfg_model_uses_forward_with_cfg_of_a_dit():
    calls = []
    original = FAST.forward_with_cfg

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    FAST.forward_with_cfg = spy
    try:
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 2])
        with torch.no_grad():
            out = CFGModel(FAST, 2.0, 10, guide_channels="all", interval=(0, 600))(x, t, y)
    finally:
        del FAST.forward_with_cfg
    assert calls == [{"guide_channels": "all", "interval": (0, 600)}]
    with torch.no_grad():
        plain = CFGModel(lambda a, b, c: FAST(a, b, c), 2.0, 10, guide_channels="all", interval=(0, 600))(x, t, y)
    assert max_rel_err(out, plain) < 1e-6


def test_bf16_autocast_and_bf16_weights():
    """bf16 sampling (weights cast once: the reference's stream in bf16, DiTFast's in fp32) and bf16 weights:
    cached sampling runs and stays near the uncached bf16 samples."""
    import copy

    kw = {"sampler": "ddim", "num_steps": 10, "cfg_scale": 2.0, "seed": 1, "progress": False}
    for model in (REF, FAST):
        base = generate(model, LABELS, dtype=torch.bfloat16, **kw)
        for spec in ("fora:2", "taylor:3:2"):
            out = generate(model, LABELS, dtype=torch.bfloat16, cache=spec, **kw)
            assert torch.isfinite(out).all() and max_rel_err(out, base) < 0.1, spec
    low = copy.deepcopy(FAST).to(torch.bfloat16)
    out = generate(low, LABELS, cache="taylor:3:2", dtype=torch.bfloat16, **kw)
    assert torch.isfinite(out).all()
