"""The flow-matching objective and samplers against SiT's own code (tests/fixtures/sit_transport.safetensors, see
tests/fixtures/README.md), and their use through DiTFast, guidance and the step cache."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from dit_fast.cache import step_cache
from dit_fast.diffusion import CFGModel, FlowSampler, TimeSampling, create_transport, flow_nfe
from dit_fast.models.dit import DiTFast
from dit_fast.reference import DiT
from tests.helpers import ROOT, assert_close

FIXTURE = ROOT / "tests" / "fixtures" / "sit_transport.safetensors"
PATHS, PREDICTIONS, WEIGHTS = ["Linear", "GVP", "VP"], ["velocity", "score", "noise"], ["none", "velocity",
                                                                                        "likelihood"]


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def net(fx: dict[str, torch.Tensor]) -> DiT:
    """The fixture's network: a learned-sigma (8-channel) DiT, whose second half the flow code drops as SiT."""
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    model.load_state_dict({k[len("model."):]: v for k, v in fx.items() if k.startswith("model.")}, strict=True)
    return model.eval()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_losses_match_sit(fx, net, path, prediction):
    t0, t1 = create_transport(path, prediction).interval()
    assert (t0, t1) == pytest.approx(fx[f"train_interval.{path}.{prediction}"].tolist(), abs=1e-12)
    t = fx[f"t.{path}.{prediction}"]
    assert_close(fx["u"] * (t1 - t0) + t0, t, atol=0, rtol=1e-7, name="training times")
    for weight in WEIGHTS:
        transport = create_transport(path, prediction, weight)
        with torch.no_grad():
            loss = transport.training_losses(net, fx["x1"], {"y": fx["y"]}, t=t, noise=fx["x0"])["loss"]
        assert_close(loss, fx[f"loss.{path}.{prediction}.{weight}"], atol=1e-6, rtol=2e-6,
                     name=f"loss {path}/{prediction}/{weight}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_drift_and_score_match_sit(fx, net, path, prediction):
    transport = create_transport(path, prediction)
    with torch.no_grad():
        drift = transport.drift(net, fx["drift_x"], fx["drift_t"], {"y": fx["y"]})
        score = transport.score(net, fx["drift_x"], fx["drift_t"], {"y": fx["y"]})
    assert_close(drift, fx[f"drift.{path}.{prediction}"], atol=1e-5, rtol=1e-5, name="drift")
    assert_close(score, fx[f"score.{path}.{prediction}"], atol=1e-5, rtol=1e-5, name="score")


ODE_CASES = [("euler", "Linear", "velocity"), ("euler", "GVP", "velocity"), ("euler", "Linear", "noise"),
             ("euler", "VP", "score"), ("heun2", "Linear", "velocity"), ("heun2", "GVP", "velocity"),
             ("heun2", "Linear", "noise"), ("heun2", "VP", "score"), ("dopri5", "Linear", "velocity")]


@pytest.mark.parametrize("method,path,prediction", ODE_CASES)
def test_guided_ode_steps_match_sit(fx, net, method, path, prediction):
    """Three steps of SiT's ODE sampler (4 time points), guided at scale 4 on 3 channels as SiT's
    ``forward_with_cfg``, through ``CFGModel`` over the 8-channel network."""
    if method == "dopri5" and importlib.util.find_spec("torchdiffeq") is None:
        pytest.skip("torchdiffeq is not installed (the ode-dopri5 sampler needs it)")
    guided = CFGModel(net, 4.0, null_class=10, guide_channels=3)
    sampler = FlowSampler(create_transport(path, prediction))
    with torch.no_grad():
        states = sampler.sample_ode(guided, fx["ode_z"], {"y": fx["y"]}, method=method.rstrip("2"), num_steps=4,
                                    trajectory=True)
    expected = fx[f"ode.{method}.{path}.{prediction}"]
    # dopri5 picks its steps from an error norm over the whole batch, and SiT's batch is [cond; uncond], whose
    # halves differ in the unguided channel 3: its steps differ, within the solver's tolerance (rtol 1e-3)
    tol = 1e-4 if method == "dopri5" else 2e-6
    for k, state in enumerate(states):
        scale = expected[k].abs().max().item()
        assert_close(state, expected[k], atol=tol * scale, rtol=2e-5, name=f"{method} state {k}")


SDE_CASES = [("Linear", "velocity", form, last) for form in ["sigma", "linear", "decreasing", "increasing-decreasing"]
             for last in ["Mean", "Tweedie", "Euler", None]]
SDE_CASES += [("Linear", "score", "SBDM", "Mean"), ("GVP", "noise", "SBDM", "Tweedie"),
              ("VP", "velocity", "SBDM", "Mean"), ("GVP", "velocity", "sigma", "Mean")]


@pytest.mark.parametrize("path,prediction,form,last", SDE_CASES)
def test_sde_steps_match_sit(fx, net, path, prediction, form, last):
    """SiT's Euler-Maruyama sampler with 4 time points (3 noisy steps, then the last step), same global-RNG noise."""
    sampler = FlowSampler(create_transport(path, prediction))
    torch.manual_seed(1234)
    with torch.no_grad():
        states = sampler.sample_sde(net, fx["ode_z"].clone(), {"y": fx["y"]}, num_steps=4, diffusion_form=form,
                                    last_step=last, last_step_size=0.04, trajectory=True)
    expected = fx[f"sde.{path}.{prediction}.{form}.{last}"]
    assert len(states) == len(expected) == flow_nfe("sde", 4, last) + (last is None)
    for k, state in enumerate(states):
        scale = expected[k].abs().max().item()
        assert_close(state, expected[k], atol=2e-6 * scale, rtol=2e-5, name=f"sde state {k}")


def test_constant_diffusion_runs_where_sit_fails(net):
    """SiT's ``constant`` form returns a float its sampler cannot take the square root of; here it is D = norm."""
    sampler = FlowSampler(create_transport())
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = sampler.sample_sde(net, z, {"y": torch.tensor([1, 2])}, num_steps=5, diffusion_form="constant",
                                 generator=torch.Generator().manual_seed(1))
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_time_sampling():
    g = torch.Generator().manual_seed(0)
    assert TimeSampling.parse("lognormal").spec == "lognormal:0:1"
    ts = TimeSampling.parse("lognormal:0.5:1.2")
    assert TimeSampling.parse(ts.spec) == ts
    t = ts.flow_times(20000, 0.0, 1.0, generator=g)
    assert 0 < t.min() and t.max() < 1
    # t = 1 - sigmoid(m + s n): the median of t is 1 - sigmoid(m)
    assert t.median().item() == pytest.approx(1 - torch.sigmoid(torch.tensor(0.5)).item(), abs=0.02)
    idx = ts.ddpm_timesteps(20000, 1000, generator=g)
    assert idx.dtype == torch.int64 and 0 <= idx.min() and idx.max() <= 999
    assert idx.float().median().item() == pytest.approx(1000 * torch.sigmoid(torch.tensor(0.5)).item(), abs=20)
    uniform = TimeSampling().flow_times(5, 0.001, 0.999, generator=torch.Generator().manual_seed(3))
    assert_close(uniform, torch.rand(5, generator=torch.Generator().manual_seed(3)) * 0.998 + 0.001, atol=0, rtol=0)
    for bad in ["normal", "lognormal:1", "lognormal:a:b", "lognormal:0:0"]:
        with pytest.raises(ValueError, match="time sampling|lognormal"):
            TimeSampling.parse(bad)


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="unknown flow path"):
        create_transport("Cosine")
    with pytest.raises(ValueError, match="unknown prediction"):
        create_transport("Linear", "x0")
    with pytest.raises(ValueError, match="unknown flow sampler"):
        FlowSampler(create_transport()).sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), sampler="ode-rk4")


def _tiny_pair(learn_sigma: bool) -> tuple[DiT, DiTFast]:
    torch.manual_seed(0)
    ref = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=2, num_classes=10,
              learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = DiTFast(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=2, num_classes=10,
                   learn_sigma=learn_sigma)
    fast.load_state_dict(ref.state_dict())
    return ref.eval(), fast.eval()


@pytest.mark.parametrize("sampler,guide", [("ode-heun", 3), ("sde", "all")])
def test_guided_flow_sampling_dit_fast_equals_reference(sampler, guide):
    ref, fast = _tiny_pair(learn_sigma=False)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 4, 9])
    flow = FlowSampler(create_transport())
    outs = []
    for model in (ref, fast):
        guided = CFGModel(model, 3.0, null_class=10, guide_channels=guide, interval=(0.2, 1.0))
        with torch.no_grad():
            outs.append(flow.sample(guided, z, {"y": y}, sampler=sampler, num_steps=6,
                                    generator=torch.Generator().manual_seed(2)) if sampler == "sde" else
                        flow.sample(guided, z, {"y": y}, sampler=sampler, num_steps=6))
    assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5, name=f"{sampler} DiTFast vs reference")


def test_step_cache_with_flow_samplers():
    """A cache counts every network evaluation of a flow sampler as a step; "none" changes nothing."""
    _, fast = _tiny_pair(learn_sigma=False)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 5])
    flow = FlowSampler(create_transport())
    guided = CFGModel(fast, 2.0, null_class=10)
    with torch.no_grad():
        plain = flow.sample(guided, z, {"y": y}, sampler="ode-heun", num_steps=9)
        with step_cache(fast, "none"):
            same = flow.sample(guided, z, {"y": y}, sampler="ode-heun", num_steps=9)
        with step_cache(fast, "fora:2") as cache:
            cached = flow.sample(guided, z, {"y": y}, sampler="ode-heun", num_steps=9)
    assert torch.equal(plain, same)
    assert cache.full_steps + cache.cached_steps == flow_nfe("ode-heun", 9) == 16
    assert cache.cached_steps == 8
    assert (cached - plain).abs().max() < 0.5 * plain.abs().max()


def test_guidance_interval_in_flow_time(net):
    """An interval (lo, hi) in flow time: guided inside, the conditional output outside."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    guided = CFGModel(net, 3.0, null_class=10, interval=(0.5, 1.0))
    with torch.no_grad():
        outside = guided(x, torch.full((2,), 0.3), y)
        inside = guided(x, torch.full((2,), 0.7), y)
        plain = CFGModel(net, 3.0, null_class=10)(x, torch.full((2,), 0.7), y)
    assert torch.equal(outside, net(x, torch.full((2,), 0.3), y))
    assert_close(inside, plain, atol=1e-6, rtol=1e-6, name="guided inside the interval")
