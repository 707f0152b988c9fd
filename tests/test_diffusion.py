"""Gaussian diffusion: official DiT outputs, closed-form math, respacing, losses and input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dit_fast.diffusion import (
    LossType,
    ModelMeanType,
    ModelVarType,
    approx_standard_normal_cdf,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)
from tests.helpers import OFFICIAL_FIXTURE, assert_close, load_official_fixture


def constant_model(output: torch.Tensor):
    """A model returning ``output`` whatever its inputs (checks shapes like a real model would not)."""
    return lambda x, t, **kwargs: output


def random_output(x: torch.Tensor, channels_factor: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape[0], channels_factor * x.shape[1], *x.shape[2:], generator=gen, dtype=x.dtype)


# ----------------------------------------------------------------------------- official outputs

DIFFUSIONS = {"diffusion1000": "", "diffusion250": "250"}


@pytest.fixture(scope="module", params=["tiny", "odd"])
def official(request):
    """(fixture tensors, reference DiT with the official weights) for one config."""
    reference = pytest.importorskip("dit_fast.reference", reason="dit_fast.reference (the model) is not available")
    tensors = load_official_fixture(request.param)
    config = json.loads(OFFICIAL_FIXTURE.with_suffix(".json").read_text())["configs"][request.param]
    model = reference.DiT(**config).eval()
    prefix = "state_dict."
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return tensors, model


def _close(actual, expected, name):
    # fp32 rounding: relative ~1e-5 of the tensor's scale (the model's attention may differ in the last bits)
    assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5, name=name)


@pytest.mark.parametrize("name", list(DIFFUSIONS))
def test_matches_official_diffusion(official, name):
    f, model = official
    diffusion = create_diffusion(DIFFUSIONS[name])
    t, y, x_start, noise = f[f"{name}.t"], f["y"], f["x_start"], f["noise"]
    kwargs = {"y": y}

    x_t = diffusion.q_sample(x_start, t, noise=noise)
    _close(x_t, f[f"{name}.x_t"], "q_sample")
    with torch.no_grad():
        losses = diffusion.training_losses(model, x_start, t, model_kwargs=kwargs, noise=noise)
        for key in ("loss", "mse", "vb"):
            _close(losses[key], f[f"{name}.training_losses.{key}"], f"training_losses.{key}")
        out = diffusion.p_mean_variance(model, f[f"{name}.x_t"], t, clip_denoised=False, model_kwargs=kwargs)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            _close(out[key], f[f"{name}.p_mean_variance.{key}"], f"p_mean_variance.{key}")
        step = diffusion.ddim_sample(model, f[f"{name}.x_t"], t, clip_denoised=False, model_kwargs=kwargs, eta=0.0)
        _close(step["sample"], f[f"{name}.ddim_eta0.sample"], "ddim_sample")


# ----------------------------------------------------------------------------- schedules

def test_linear_schedule():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    short = get_named_beta_schedule("linear", 250)  # ends scaled by 1000 / 250
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule():
    steps = 100
    betas = get_named_beta_schedule("squaredcos_cap_v2", steps)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alphas_cumprod = np.cumprod(1 - betas)
    expected = np.array([f((i + 1) / steps) / f(0) for i in range(steps)])
    assert np.allclose(alphas_cumprod[:-1], expected[:-1], rtol=1e-10)
    assert betas[-1] == 0.999  # alpha_bar(1) = 0: capped
    assert (betas <= 0.999).all()


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosine'.*squaredcos_cap_v2"):
        create_diffusion("", noise_schedule="cosine")


# ----------------------------------------------------------------------------- closed forms

def _tables(steps: int = 1000):
    betas = np.linspace(1e-4, 0.02, steps) * 1000 / steps
    return betas, np.cumprod(1 - betas)


def test_q_sample_and_q_mean_variance_closed_form():
    diffusion = create_diffusion("")
    _, abar = _tables()
    x0 = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 17, 500, 999])
    a = torch.from_numpy(abar)[t].view(-1, 1, 1, 1)
    assert_close(diffusion.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-12, rtol=1e-12)
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    assert_close(mean, a.sqrt() * x0, atol=1e-12, rtol=1e-12)
    assert_close(var, (1 - a).expand_as(x0), atol=1e-12, rtol=1e-12)
    assert_close(log_var, (1 - a).log().expand_as(x0), atol=1e-12, rtol=1e-12)
    # statistically: q_sample with fresh noise has that mean and variance
    torch.manual_seed(0)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 300)
    samples = diffusion.q_sample(x0, t)
    assert samples.mean().item() == pytest.approx(0.7 * math.sqrt(abar[300]), abs=4 * math.sqrt(1 - abar[300]) / 141)
    assert samples.var().item() == pytest.approx(1 - abar[300], rel=0.04)


def test_posterior_closed_form():
    """q(x_{t-1} | x_t, x_0) by Gaussian conditioning: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) times the
    likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
    diffusion = create_diffusion("")
    betas, abar = _tables()
    x0, xt = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 250, 999])
    b = torch.from_numpy(betas)[t].view(-1, 1, 1, 1)
    prev = torch.from_numpy(abar)[t - 1].view(-1, 1, 1, 1)
    precision = 1 / (1 - prev) + (1 - b) / b
    var = 1 / precision
    mean = var * (prev.sqrt() * x0 / (1 - prev) + (1 - b).sqrt() * xt / b)
    got_mean, got_var, got_log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    assert_close(got_mean, mean, atol=1e-10, rtol=1e-10)
    assert_close(got_var, var.expand_as(x0), atol=1e-14, rtol=1e-10)
    assert_close(got_log_var, var.log().expand_as(x0), atol=1e-10, rtol=1e-10)
    # step 0: the posterior is the point x_0; its log variance is clipped to step 1's
    t0 = torch.zeros(3, dtype=torch.long)
    mean0, var0, log_var0 = diffusion.q_posterior_mean_variance(x0, xt, t0)
    assert_close(mean0, x0, atol=1e-12, rtol=1e-12)
    assert (var0 == 0).all()
    assert torch.allclose(log_var0, torch.tensor(math.log(diffusion.posterior_variance[1]), dtype=torch.float64))


def test_normal_kl_against_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    lv1, lv2 = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert_close(normal_kl(m1, lv1, m2, lv2), expected, atol=1e-12, rtol=1e-10)
    assert_close(normal_kl(m1, lv1, 0.0, 0.0), normal_kl(m1, lv1, torch.zeros_like(m1), torch.zeros_like(lv1)))
    with pytest.raises(TypeError, match="at least one"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_discretized_gaussian_log_likelihood():
    scipy_stats = pytest.importorskip("scipy.stats")
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 values of 8-bit data
    means = torch.tensor([-0.4, 0.0, 0.3, 0.95], dtype=torch.float64)[:, None].expand(4, 256)
    log_scales = torch.log(torch.tensor([0.02, 0.1, 0.3, 0.05], dtype=torch.float64))[:, None].expand(4, 256)
    x = bins.expand(4, 256)
    logp = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    # a distribution over the 256 bins (telescoping CDFs), wherever no bin hit the 1e-12 floor
    assert_close(logp.exp().sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-9, rtol=0)
    # against the exact normal CDF from scipy (the tanh approximation is good to ~2e-4 in the CDF)
    s, m, xv = log_scales.exp().numpy(), means.numpy(), x.numpy()
    upper = np.where(xv > 0.999, 1.0, scipy_stats.norm.cdf((xv - m + 1 / 255) / s))
    lower = np.where(xv < -0.999, 0.0, scipy_stats.norm.cdf((xv - m - 1 / 255) / s))
    exact = torch.from_numpy(upper - lower)
    assert (logp.exp() - exact).abs().max().item() < 5e-4
    heavy = exact > 0.01  # bins that carry probability: log-probabilities agree closely
    assert (logp[heavy] - exact[heavy].log()).abs().max().item() < 0.02
    # the approximation itself against scipy
    z = torch.linspace(-5, 5, 101, dtype=torch.float64)
    assert (approx_standard_normal_cdf(z) - torch.from_numpy(scipy_stats.norm.cdf(z.numpy()))).abs().max() < 2e-4
    with pytest.raises(ValueError, match="shapes differ"):
        discretized_gaussian_log_likelihood(x[:2], means=means, log_scales=log_scales)


# ----------------------------------------------------------------------------- p_mean_variance variants

def test_learned_range_variance_interpolates_in_log_space():
    diffusion = create_diffusion("")
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])
    lo = torch.from_numpy(diffusion.posterior_log_variance_clipped)[t].view(-1, 1, 1, 1)
    hi = torch.log(torch.from_numpy(diffusion.betas))[t].view(-1, 1, 1, 1)
    for value, expected in ((-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2)):
        output = torch.cat([torch.zeros_like(x), torch.full_like(x, value)], dim=1)
        out = diffusion.p_mean_variance(constant_model(output), x, t)
        assert_close(out["log_variance"], expected.expand_as(x), atol=1e-12, rtol=1e-12, name=f"v={value}")
        assert_close(out["variance"], expected.exp().expand_as(x), atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("sigma_small", [True, False])
def test_fixed_variances(sigma_small):
    diffusion = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
    assert diffusion.model_var_type == (ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])
    out = diffusion.p_mean_variance(constant_model(torch.zeros_like(x)), x, t)
    if sigma_small:
        expected = diffusion.posterior_variance[t.numpy()]
        expected[0] = diffusion.posterior_variance[1]  # log variance clipped at step 0
    else:
        expected = diffusion.betas[t.numpy()]
        expected[0] = diffusion.posterior_variance[1]
    assert_close(out["log_variance"][:, 0, 0, 0], torch.from_numpy(np.log(expected)), atol=1e-12, rtol=1e-12)
    assert out["variance"].shape == x.shape
    with pytest.raises(ValueError, match="fixed-variance"):
        diffusion.p_mean_variance(constant_model(random_output(x)), x, t)


def test_eps_and_xstart_parametrizations_and_clipping():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 3
    t = torch.tensor([5, 700])
    eps_diffusion = create_diffusion("")
    _, abar = _tables()
    a = torch.from_numpy(abar)[t].view(-1, 1, 1, 1)
    output = random_output(x)
    out = eps_diffusion.p_mean_variance(constant_model(output), x, t, clip_denoised=False)
    expected = (x - (1 - a).sqrt() * output[:, :3]) / a.sqrt()
    assert_close(out["pred_xstart"], expected, atol=1e-10, rtol=1e-10)
    assert_close(out["mean"], eps_diffusion.q_posterior_mean_variance(expected, x, t)[0], atol=1e-10, rtol=1e-10)
    clipped = eps_diffusion.p_mean_variance(constant_model(output), x, t, clip_denoised=True,
                                            denoised_fn=lambda v: v * 0.5)
    assert_close(clipped["pred_xstart"], (expected * 0.5).clamp(-1, 1), atol=1e-10, rtol=1e-10)

    x0_diffusion = create_diffusion("", predict_xstart=True)
    assert x0_diffusion.model_mean_type == ModelMeanType.START_X
    out = x0_diffusion.p_mean_variance(constant_model(output), x, t, clip_denoised=False)
    assert torch.equal(out["pred_xstart"], output[:, :3])


def test_tuple_model_output_passes_extra():
    diffusion = create_diffusion("10")
    x = torch.randn(2, 2, 3, 3)
    out = diffusion.p_mean_variance(lambda x, t: (random_output(x), {"aux": 1}), x, torch.tensor([0, 9]))
    assert out["extra"] == {"aux": 1}


def test_dtypes():
    """fp32 coefficients for fp32/bf16 inputs (as the official code), fp64 for fp64."""
    diffusion = create_diffusion("")
    t = torch.tensor([3, 600])
    for dtype, expected in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32)):
        x = torch.randn(2, 2, 3, 3).to(dtype)
        assert diffusion.q_sample(x, t, torch.randn_like(x)).dtype == expected
        assert diffusion.p_mean_variance(constant_model(random_output(x)), x, t)["mean"].dtype == expected


# ----------------------------------------------------------------------------- training losses

def test_training_losses_terms():
    diffusion = create_diffusion("")
    assert diffusion.loss_type == LossType.MSE  # the official default (rescale_learned_sigmas=False)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64).clamp(-1, 1)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 900])
    output = random_output(x0).requires_grad_(True)
    losses = diffusion.training_losses(constant_model(output), x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (3,) for v in losses.values())
    assert_close(losses["mse"], ((noise - output[:, :2]) ** 2).mean(dim=(1, 2, 3)), atol=1e-12, rtol=1e-12)
    assert_close(losses["loss"], losses["mse"] + losses["vb"], atol=1e-12, rtol=1e-12)
    # vb is the bound term of the (learned) variance with the mean frozen
    x_t = diffusion.q_sample(x0, t, noise)
    frozen = diffusion._vb_terms_bpd(constant_model(output.detach()), x0, x_t, t, clip_denoised=False)["output"]
    assert_close(losses["vb"], frozen, atol=1e-12, rtol=1e-12)
    # step 0 scores the decoder NLL; others the KL in bits
    out = diffusion.p_mean_variance(constant_model(output.detach()), x_t, t, clip_denoised=False)
    nll0 = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
    assert losses["vb"][0].item() == pytest.approx(nll0[0].mean().item() / math.log(2))
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2)
    assert_close(losses["vb"][1:], kl[1:], atol=1e-12, rtol=1e-10)
    # gradients: the vb term reaches only the variance channels
    losses["vb"].sum().backward()
    assert (output.grad[:, :2] == 0).all() and (output.grad[:, 2:] != 0).any()


def test_loss_types():
    x0 = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 100])
    model = constant_model(random_output(x0))
    plain = create_diffusion("250").training_losses(model, x0, t, noise=noise)
    rescaled = create_diffusion("250", rescale_learned_sigmas=True).training_losses(model, x0, t, noise=noise)
    assert_close(rescaled["vb"], plain["vb"] * 0.25, atol=1e-12, rtol=1e-12)
    assert_close(rescaled["mse"], plain["mse"], atol=0, rtol=0)
    kl = create_diffusion("250", use_kl=True)
    assert kl.loss_type == LossType.RESCALED_KL
    kl_losses = kl.training_losses(model, x0, t, noise=noise)
    assert set(kl_losses) == {"loss"}
    assert_close(kl_losses["loss"], plain["vb"] * 250, atol=1e-10, rtol=1e-10)
    fixed = create_diffusion("", learn_sigma=False).training_losses(constant_model(noise * 0.5), x0, t, noise=noise)
    assert set(fixed) == {"loss", "mse"}
    x0_losses = create_diffusion("", predict_xstart=True).training_losses(constant_model(random_output(x0)), x0, t,
                                                                         noise=noise)
    assert_close(x0_losses["mse"], ((x0 - random_output(x0)[:, :2]) ** 2).mean(dim=(1, 2, 3)), atol=1e-12, rtol=0)


def test_calc_bpd_loop():
    diffusion = create_diffusion("", diffusion_steps=50)  # (20 linear steps would reach beta = 1)
    x0 = torch.rand(2, 2, 3, 3, dtype=torch.float64) * 2 - 1
    torch.manual_seed(0)
    out = diffusion.calc_bpd_loop(lambda x, t: random_output(x) * 0.1, x0)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, 50)
    assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"], atol=1e-12, rtol=1e-12)
    assert (out["vb"][:, 1:] >= 0).all()  # KL terms
    assert (out["prior_bpd"] >= 0).all() and (out["prior_bpd"] < 1e-2).all()


# ----------------------------------------------------------------------------- respacing

def test_space_timesteps():
    assert space_timesteps(1000, [1000]) == set(range(1000))
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and min(steps) == 0 and max(steps) == 999
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    assert sections[:10] == list(range(0, 100, 11))  # 10 steps over the first 100, stride 99/9 = 11
    assert all(100 <= s < 200 for s in sections[10:25]) and sections[10] == 100 and sections[24] == 199
    assert sections[25] == 200 and sections[-1] == 299
    assert space_timesteps(10, "3,2,2") == {0, 2, 3, 4, 6, 7, 9}  # uneven sections: sizes 4, 3, 3


@pytest.mark.parametrize("spec, match", [("ddim600", "no integer stride"), ("1001", "cannot take 1001"),
                                         ("abc", "must be an integer"), ("10,x", "must be an integer"),
                                         ("ddimfoo", "must be an integer"), ("-5", "cannot take -5")])
def test_space_timesteps_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        create_diffusion(spec)


def test_respaced_diffusion_tables_and_model_timesteps():
    base = create_diffusion("")
    spaced = create_diffusion("ddim50")
    assert spaced.num_timesteps == 50 and spaced.timestep_map == list(range(0, 1000, 20))
    assert spaced.original_num_steps == 1000
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[::20], rtol=1e-12)
    assert spaced.betas[0] == base.betas[0]
    # the model always sees original indices
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    spaced.p_sample_loop(model, (2, 1, 2, 2), device="cpu")
    assert [s[0] for s in seen] == list(range(980, -1, -20)) and all(s[0] == s[1] for s in seen)
    seen.clear()
    spaced.training_losses(model, torch.zeros(2, 1, 2, 2), torch.tensor([0, 49]))
    assert seen == [[0, 980]]
    # q_sample at a respaced step equals the base process at the original step
    x0, noise = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert_close(spaced.q_sample(x0, torch.tensor([3, 49]), noise), base.q_sample(x0, torch.tensor([60, 980]), noise),
                 atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- errors, devices, progress

def test_bad_timesteps_and_shapes():
    diffusion = create_diffusion("250")
    x = torch.randn(2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 249\].*max 250"):
        diffusion.q_sample(x, torch.tensor([0, 250]))
    with pytest.raises(ValueError, match="min -1"):
        diffusion.q_sample(x, torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="integer tensor"):
        diffusion.q_sample(x, torch.tensor([0.0, 3.0]))
    with pytest.raises(TypeError, match="integer tensor"):
        diffusion.q_sample(x, [0, 3])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        diffusion.q_sample(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.q_sample(x, torch.tensor([0, 1]), noise=torch.randn(2, 2, 4, 5))
    with pytest.raises(ValueError, match="timesteps are on meta but x is on cpu"):
        diffusion.q_sample(x, torch.tensor([0, 1], device="meta"))
    with pytest.raises(ValueError, match="2 \\* 2 output channels"):
        diffusion.p_mean_variance(constant_model(torch.zeros(2, 2, 4, 4)), x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x_start shape"):
        diffusion.q_posterior_mean_variance(x, x[:, :1], torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="model_kwargs"):
        diffusion.p_mean_variance(constant_model(random_output(x)), x, torch.tensor([0, 1]), model_kwargs=[1])
    with pytest.raises(ValueError, match="deterministic"):
        diffusion.ddim_reverse_sample(constant_model(random_output(x)), x, torch.tensor([0, 1]), eta=0.5)


def test_bad_constructor_arguments():
    from dit_fast.diffusion import GaussianDiffusion, SpacedDiffusion

    kwargs = {"model_mean_type": ModelMeanType.EPSILON, "model_var_type": ModelVarType.LEARNED_RANGE,
              "loss_type": LossType.MSE}
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        GaussianDiffusion(betas=[0.1, 0.0], **kwargs)
    with pytest.raises(ValueError, match="1-D"):
        GaussianDiffusion(betas=[[0.1]], **kwargs)
    with pytest.raises(TypeError, match="ModelVarType"):
        GaussianDiffusion(betas=[0.1], model_mean_type=ModelMeanType.EPSILON, model_var_type="learned",
                          loss_type=LossType.MSE)
    with pytest.raises(ValueError, match="empty"):
        SpacedDiffusion([], betas=[0.1, 0.2], **kwargs)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SpacedDiffusion([0, 2], betas=[0.1, 0.2], **kwargs)


def test_sampling_loop_arguments():
    diffusion = create_diffusion("5")
    parameterless = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # noqa: E731
    with pytest.raises(ValueError, match="pass device= or noise="):
        diffusion.p_sample_loop(parameterless, (1, 1, 2, 2))
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.ddim_sample_loop(parameterless, (1, 1, 2, 2), noise=torch.zeros(1, 1, 2, 3))
    with pytest.raises(TypeError, match="tuple or list"):
        diffusion.p_sample_loop(parameterless, torch.Size([1, 1, 2, 2]).numel(), device="cpu")
    out = diffusion.p_sample_loop(parameterless, [1, 1, 2, 2], noise=torch.zeros(1, 1, 2, 2), progress=True)
    assert out.shape == (1, 1, 2, 2)
    steps = list(diffusion.ddim_sample_loop_progressive(parameterless, (1, 1, 2, 2), device="cpu"))
    assert len(steps) == 5 and set(steps[0]) == {"sample", "pred_xstart"}


def test_ddim_reverse_inverts_ddim():
    """With an x_0-consistent (point-mass) model, a reverse DDIM step undoes a forward one."""
    diffusion = create_diffusion("50")
    target = torch.full((1, 2, 2, 2), 0.25, dtype=torch.float64)
    abar = torch.from_numpy(create_diffusion("").alphas_cumprod)

    def model(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return torch.cat([(x - a.sqrt() * target) / (1 - a).sqrt(), torch.zeros_like(x)], dim=1)

    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([30])
    down = diffusion.ddim_sample(model, x, t, clip_denoised=False)["sample"]
    up = diffusion.ddim_reverse_sample(model, down, t - 1, clip_denoised=False)["sample"]
    assert_close(up, x, atol=1e-10, rtol=1e-10)


def test_cond_fn_conditioning():
    """cond_fn (grad log p(y | x)) shifts the DDPM mean by variance * grad and the DDIM eps by
    -sqrt(1 - abar) * grad; it is called with the original timesteps."""
    diffusion = create_diffusion("50")
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([1, 40])
    model = constant_model(random_output(x))
    grad = torch.full_like(x, 0.3)
    seen = []

    def cond_fn(x, t, **kwargs):
        seen.append(t.tolist())
        return grad

    plain = diffusion.p_mean_variance(model, x, t)
    assert_close(diffusion.condition_mean(cond_fn, plain, x, t), plain["mean"] + plain["variance"] * grad,
                 atol=1e-6, rtol=1e-6)
    assert seen == [[diffusion.timestep_map[1], diffusion.timestep_map[40]]]
    scored = diffusion.condition_score(cond_fn, plain, x, t)
    abar = torch.from_numpy(diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    eps = diffusion._predict_eps_from_xstart(x, t, plain["pred_xstart"]) - (1 - abar).sqrt() * grad
    assert_close(scored["pred_xstart"], diffusion._predict_xstart_from_eps(x, t, eps), atol=1e-10, rtol=1e-10)
    torch.manual_seed(0)
    sample = diffusion.p_sample(model, x, t, cond_fn=cond_fn)["sample"]
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    expected = plain["mean"] + plain["variance"] * grad + (0.5 * plain["log_variance"]).exp() * noise
    assert_close(sample, expected, atol=1e-6, rtol=1e-6)
