"""Samplers (DDPM, DDIM, DPM-Solver++(2M)) and classifier-free guidance on models with known answers.

The test model is the Bayes-optimal predictor for Gaussian data x_0 ~ N(mu[y, c], s[c]^2), independent per element:
with a = sqrt(abar_t), sigma^2 = 1 - abar_t and v = a^2 s^2 + sigma^2,

    E[eps | x_t] = sigma (x_t - a mu) / v,        Var[x_0 | x_t] = s^2 sigma^2 / v,

and its learned-variance channels give the exact reverse variance ``beta~_t + coef1_t^2 Var[x_0 | x_t]``. So
ancestral sampling draws exactly from N(mu, s^2), the probability-flow ODE maps x_T to
``mu + s (x_T - a_T mu) / sqrt(v_T)``, and for point masses (s = 0) every sampler must land on mu.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dit_fast.diffusion import CFGModel, GaussianDiffusion, SpacedDiffusion, create_diffusion
from dit_fast.diffusion.dpm_solver import dpm_solver_pp_2m_update, dpm_solver_step_indices
from tests.helpers import assert_close


class GaussianDataModel(torch.nn.Module):
    """Optimal (eps, variance values) predictor of ``diffusion`` for x_0 ~ N(mu[y], s^2) (see module docstring).

    mu: (K, C) class means; s: (C,) standard deviations. Called as ``model(x, t, y=None)`` with *original*
    timesteps, as the diffusion calls every model; computes in float64 and returns x's dtype, (N, 2C, ...).
    """

    def __init__(self, diffusion: GaussianDiffusion, mu: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", mu.double())
        self.register_buffer("s", s.double())
        self.step_of = {orig: k for k, orig in enumerate(diffusion.timestep_map)}
        self.tables = {name: torch.from_numpy(np.asarray(getattr(diffusion, name))) for name in (
            "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_log_variance_clipped",
            "log_betas")}
        self.calls: list[tuple[int, list[int]]] = []  # (batch size, original timesteps) per call

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((x.shape[0], t.tolist()))
        k = torch.tensor([self.step_of[int(v)] for v in t])
        shape = (-1, *([1] * (x.ndim - 1)))
        col = {name: table[k].view(shape) for name, table in self.tables.items()}  # (N, 1, ...)
        mu = self.mu[torch.zeros_like(k) if y is None else y.cpu()].view(x.shape[0], -1, *([1] * (x.ndim - 2)))
        s2 = (self.s ** 2).view(1, -1, *([1] * (x.ndim - 2)))
        a, sigma2 = col["alphas_cumprod"].sqrt(), 1 - col["alphas_cumprod"]
        v = a ** 2 * s2 + sigma2
        eps = sigma2.sqrt() * (x.double() - a * mu) / v
        reverse_var = col["posterior_variance"] + col["posterior_mean_coef1"] ** 2 * s2 * sigma2 / v
        lo, hi = col["posterior_log_variance_clipped"], col["log_betas"]
        values = 2 * (reverse_var.clamp_min(1e-30).log() - lo) / (hi - lo) - 1
        return torch.cat([eps, values.expand_as(eps)], dim=1).to(x.dtype)


def ode_solution(x_t: torch.Tensor, abar_t: float, abar_0: float, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact probability-flow ODE map from abar_t to abar_0 for N(mu, s^2) data, followed by the x_0 prediction at
    abar_0 (the last step of every sampler here). mu, s: (C,); x_t: (N, C, ...)."""
    shape = (1, -1, *([1] * (x_t.ndim - 2)))
    mu, s2 = mu.double().view(shape), (s.double() ** 2).view(shape)
    a_t, a_0 = math.sqrt(abar_t), math.sqrt(abar_0)
    v_t, v_0 = a_t ** 2 * s2 + 1 - abar_t, a_0 ** 2 * s2 + 1 - abar_0
    x_0 = a_0 * mu + (v_0 / v_t).sqrt() * (x_t.double() - a_t * mu)
    return mu + a_0 * s2 * (x_0 - a_0 * mu) / v_0


MU = torch.tensor([[0.3, -0.5], [0.6, 0.1]])  # two classes, two channels
S = torch.tensor([0.5, 0.2])


def gaussian_setup(spec: str, s: torch.Tensor = S, shape: tuple[int, ...] = (8, 2, 32, 32), seed: int = 0):
    diffusion = create_diffusion(spec)
    model = GaussianDataModel(diffusion, MU, s)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen)
    return diffusion, model, noise


# ----------------------------------------------------------------------------- point masses: all samplers exact

@pytest.mark.parametrize("sampler", ["p_sample_loop", "ddim_sample_loop", "dpm_solver_sample_loop"])
@pytest.mark.parametrize("spec", ["", "50"])
def test_point_mass_every_sampler_lands_on_it(sampler, spec):
    diffusion, model, noise = gaussian_setup(spec, s=torch.zeros(2), shape=(2, 2, 4, 4))
    y = torch.tensor([0, 1])
    kwargs = {"num_steps": 10} if sampler == "dpm_solver_sample_loop" else {}
    torch.manual_seed(0)
    out = getattr(diffusion, sampler)(model, noise.shape, noise=noise, model_kwargs={"y": y}, **kwargs)
    expected = MU[y].view(2, 2, 1, 1).expand_as(out)
    assert_close(out, expected, atol=1e-5, rtol=0, name=sampler)


# ----------------------------------------------------------------------------- Gaussian data

@pytest.mark.parametrize("spec", ["250", "25"])
def test_ddpm_samples_the_data_distribution(spec):
    """Ancestral sampling with the exact reverse mean and variance reproduces N(mu, s^2) per channel."""
    diffusion, model, noise = gaussian_setup(spec)
    torch.manual_seed(1)
    out = diffusion.p_sample_loop(model, noise.shape, noise=noise, clip_denoised=False,
                                  model_kwargs={"y": torch.zeros(8, dtype=torch.long)})
    n = out[:, 0].numel()
    for c in range(2):
        mean, std = out[:, c].mean().item(), out[:, c].std().item()
        assert abs(mean - MU[0, c].item()) < 4 * S[c].item() / math.sqrt(n), (c, mean)
        assert abs(std / S[c].item() - 1) < 4 / math.sqrt(2 * n), (c, std)


def _ode_error(diffusion, out, noise, s=S):
    ref = ode_solution(noise, diffusion.alphas_cumprod[-1], diffusion.alphas_cumprod[0], MU[0], s)
    return (out.double() - ref).abs().max().item()


def test_ddim_and_dpm_solver_follow_the_probability_flow_ode():
    """Deterministic samplers converge to the exact ODE map; DPM-Solver++(2M) at second order, DDIM at first.

    (Few-step DDIM shrinks Gaussian data noticeably: each step multiplies the deviation by cos(delta theta).)
    """
    y = {"y": torch.zeros(8, dtype=torch.long)}
    full, model, noise = gaussian_setup("")
    noise = noise[:, :, :8, :8]
    err_dpm, err_ddim = {}, {}
    for n in (20, 40):
        err_dpm[n] = _ode_error(full, full.dpm_solver_sample_loop(model, noise.shape, noise=noise, clip_denoised=False,
                                                                  model_kwargs=y, num_steps=n), noise)
        spaced = create_diffusion(str(n))
        ddim_model = GaussianDataModel(spaced, MU, S)
        err_ddim[n] = _ode_error(spaced, spaced.ddim_sample_loop(ddim_model, noise.shape, noise=noise,
                                                                 clip_denoised=False, model_kwargs=y), noise)
    assert err_dpm[40] < 1e-2, err_dpm
    assert err_dpm[20] < err_ddim[20] / 4, (err_dpm, err_ddim)
    assert err_dpm[20] / err_dpm[40] > 3.0, err_dpm  # second order: ~4x per halving
    assert 1.5 < err_ddim[20] / err_ddim[40] < 2.5, err_ddim  # first order: ~2x per halving
    # with all 1000 steps the solver is essentially exact
    exact = full.dpm_solver_sample_loop(model, noise.shape, noise=noise, clip_denoised=False, model_kwargs=y,
                                        num_steps=1000)
    assert _ode_error(full, exact, noise) < 1e-3


def test_dpm_solver_matches_diffusers_dpmsolver_multistep():
    """Independent check of the 2M update: diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2) on the
    same timesteps and eps (its schedule is float32, hence the tolerance)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is optional (a dev dependency)")
    full, model, noise = gaussian_setup("", shape=(2, 2, 4, 4))
    indices = dpm_solver_step_indices(full.alphas_cumprod, 12)
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                                      beta_schedule="linear", algorithm_type="dpmsolver++",
                                                      solver_order=2, lower_order_final=True,
                                                      final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=indices)
    x = noise.clone()
    for t in scheduler.timesteps:
        eps = model(x, torch.full((2,), int(t)))[:, :2]
        x = scheduler.step(eps, t, x).prev_sample
    ours = full.dpm_solver_sample_loop(model, noise.shape, noise=noise, clip_denoised=False, num_steps=12)
    assert_close(ours, x, atol=1e-4, rtol=1e-4, name="dpm-solver++ vs diffusers")


def test_dpm_solver_first_step_is_ddim():
    """The first (first-order) DPM-Solver++ step equals the DDIM step between the same two steps."""
    full, model, noise = gaussian_setup("", shape=(2, 2, 4, 4))
    dpm_first = next(full.dpm_solver_sample_loop_progressive(model, noise.shape, noise=noise, num_steps=10))
    spaced = SpacedDiffusion(dpm_solver_step_indices(full.alphas_cumprod, 10), betas=full.betas,
                             model_mean_type=full.model_mean_type, model_var_type=full.model_var_type,
                             loss_type=full.loss_type)
    ddim_first = next(spaced.ddim_sample_loop_progressive(GaussianDataModel(spaced, MU, S), noise.shape, noise=noise))
    assert_close(dpm_first["sample"], ddim_first["sample"], atol=1e-6, rtol=1e-5, name="first step")
    assert_close(dpm_first["pred_xstart"], ddim_first["pred_xstart"], atol=1e-6, rtol=1e-5, name="x0")


def test_dpm_solver_update_closed_form():
    x, x0, x0_prev = torch.randn(3, 2, 5, dtype=torch.float64)
    ab_s, ab_t = 0.3, 0.6
    out, h = dpm_solver_pp_2m_update(x, x0, x0_prev, ab_s, ab_t, h_prev=0.4)
    lam = lambda ab: 0.5 * math.log(ab / (1 - ab))  # noqa: E731
    assert h == pytest.approx(lam(ab_t) - lam(ab_s))
    r = 0.4 / h
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    expected = math.sqrt((1 - ab_t) / (1 - ab_s)) * x - math.sqrt(ab_t) * (math.exp(-h) - 1) * d
    assert_close(out, expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="less noise"):
        dpm_solver_pp_2m_update(x, x0, None, ab_t, ab_s, None)
    with pytest.raises(ValueError, match="h_prev"):
        dpm_solver_pp_2m_update(x, x0, x0_prev, ab_s, ab_t, None)


def test_dpm_solver_step_indices():
    alphas_cumprod = create_diffusion("").alphas_cumprod
    lambdas = 0.5 * np.log(alphas_cumprod / (1 - alphas_cumprod))
    assert dpm_solver_step_indices(alphas_cumprod, 1) == [999]
    assert dpm_solver_step_indices(alphas_cumprod, 2) == [999, 0]
    for n in (3, 7, 20, 40, 250, 999, 1000):
        idx = dpm_solver_step_indices(alphas_cumprod, n)
        assert len(idx) == len(set(idx)) == n and idx[0] == 999 and idx[-1] == 0 and idx == sorted(idx, reverse=True)
    assert dpm_solver_step_indices(alphas_cumprod, 1000) == list(range(999, -1, -1))
    gaps = np.diff(lambdas[dpm_solver_step_indices(alphas_cumprod, 10)])
    assert gaps.max() / gaps.min() < 1.1  # uniform in log-SNR up to the rounding to whole steps
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            dpm_solver_step_indices(alphas_cumprod, bad)


def test_dpm_solver_counts_model_calls_and_maps_timesteps():
    spaced, model, noise = gaussian_setup("50", shape=(1, 2, 2, 2))
    spaced.dpm_solver_sample_loop(model, noise.shape, noise=noise, num_steps=5)
    expected = [spaced.timestep_map[k] for k in dpm_solver_step_indices(spaced.alphas_cumprod, 5)]
    assert [t[0] for _, t in model.calls] == expected
    model.calls.clear()
    spaced.dpm_solver_sample_loop(model, noise.shape, noise=noise, num_steps=50)
    assert [t[0] for _, t in model.calls] == spaced.timestep_map[::-1]


# ----------------------------------------------------------------------------- classifier-free guidance

class AffineModel(torch.nn.Module):
    """A label- and time-dependent model with 2C output channels: out = W x + b[y] + t / 1000."""

    def __init__(self, channels: int, num_classes: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(2 * channels, channels, generator=gen))
        self.b = torch.nn.Parameter(torch.randn(num_classes + 1, 2 * channels, generator=gen))
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return torch.einsum("oc,nchw->nohw", self.w, x) + self.b[y][:, :, None, None] + t.view(-1, 1, 1, 1) / 1000


def official_forward_with_cfg(forward, x, t, y, cfg_scale):
    """The official DiT ``forward_with_cfg``, written out (guides output channels 0..2)."""
    half = x[: len(x) // 2]
    out = forward(torch.cat([half, half]), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def _cfg_inputs(channels: int = 4, n: int = 3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, channels, 4, 4, generator=gen)
    t = torch.tensor([10, 500, 990])[:n]
    y = torch.tensor([0, 3, 4])[:n]
    return x, t, y


def test_cfg_matches_official_forward_with_cfg():
    model = AffineModel(4)
    x, t, y = _cfg_inputs()
    guided = CFGModel(model, cfg_scale=4.0, null_class=5)(x, t, y)
    official = official_forward_with_cfg(model, torch.cat([x, x]), torch.cat([t, t]),
                                         torch.cat([y, torch.full_like(y, 5)]), 4.0)
    assert torch.equal(guided, official[:3])
    assert model.batch_sizes == [6, 6]  # one doubled pass each


def test_cfg_matches_reference_dit_forward_with_cfg():
    reference = pytest.importorskip("dit_fast.reference", reason="dit_fast.reference not available")
    torch.manual_seed(0)
    dit = reference.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2,
                        num_classes=10).eval()
    for p in dit.parameters():  # the zero-initialised output layers would make every output 0
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = _cfg_inputs()
    x = torch.randn(3, 4, 8, 8)
    null = torch.full_like(y, 10)
    with torch.no_grad():
        for channels in (3, "all"):
            ours = CFGModel(dit, cfg_scale=2.5, null_class=10, guide_channels=channels)(x, t, y)
            theirs = dit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 2.5,
                                          guide_channels=channels)
            assert_close(ours, theirs[:3], atol=1e-6, rtol=1e-5, name=f"guide_channels={channels}")


def test_cfg_channel_selection():
    model = AffineModel(4)
    x, t, y = _cfg_inputs()
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 5))
    scale = 3.0
    full = uncond + scale * (cond - uncond)
    for channels, k in ((3, 3), ("all", 4), (1, 1), (10, 4)):
        out = CFGModel(model, scale, null_class=5, guide_channels=channels)(x, t, y)
        assert_close(out[:, :k], full[:, :k], atol=1e-5, rtol=1e-5, name=f"guided {channels}")
        assert_close(out[:, k:], cond[:, k:], atol=1e-6, rtol=1e-6, name=f"unguided channels, {channels}")
    # fewer than 3 input channels: only the eps channels are guided, never the variance channels
    small = AffineModel(2)
    x2 = x[:, :2]
    cond2, uncond2 = small(x2, t, y), small(x2, t, torch.full_like(y, 5))
    out2 = CFGModel(small, scale, null_class=5)(x2, t, y)
    assert_close(out2[:, :2], (uncond2 + scale * (cond2 - uncond2))[:, :2], atol=1e-5, rtol=1e-5)
    assert_close(out2[:, 2:], cond2[:, 2:], atol=1e-6, rtol=1e-6, name="variance channels")


def test_cfg_interval_and_scale_one():
    model = AffineModel(4)
    x, t, y = _cfg_inputs()
    cond = model(x, t, y)
    always = CFGModel(model, 2.0, null_class=5)(x, t, y)
    model.batch_sizes.clear()
    inside = CFGModel(model, 2.0, null_class=5, interval=(400, 999))(x, t, y)  # t = 10 is outside
    assert torch.equal(inside[1:], always[1:])
    assert torch.equal(inside[:1], cond[:1])
    outside = CFGModel(model, 2.0, null_class=5, interval=(0, 5))(x, t, y)
    assert torch.equal(outside, cond)
    assert model.batch_sizes == [6, 3]  # no unconditional pass when no element is inside
    model.batch_sizes.clear()
    assert torch.equal(CFGModel(model, 1.0, null_class=5)(x, t, y), cond)
    assert model.batch_sizes == [3]


def test_cfg_bad_arguments():
    model = AffineModel(4)
    with pytest.raises(ValueError, match="guide_channels"):
        CFGModel(model, 2.0, 5, guide_channels=0)
    with pytest.raises(ValueError, match="guide_channels"):
        CFGModel(model, 2.0, 5, guide_channels="some")
    with pytest.raises(ValueError, match="interval"):
        CFGModel(model, 2.0, 5, interval=(10, 5))
    with pytest.raises(TypeError, match="callable"):
        CFGModel(None, 2.0, 5)
    x, t, y = _cfg_inputs()
    with pytest.raises(ValueError, match="shape"):
        CFGModel(model, 2.0, 5)(x, t[:2], y)


@pytest.mark.parametrize("channels", [3, "all"])
def test_cfg_in_samplers_lands_on_scaled_point_mass(channels):
    """Point masses at mu_y (conditional) and 0 (null class): guided eps is the eps of a point mass at
    cfg_scale * mu_y, so every sampler lands there on the guided channels and on mu_y on the others."""
    mu = torch.tensor([[0.2, -0.1, 0.15, 0.3], [0.0, 0.0, 0.0, 0.0]])  # class 0, null class 1
    for spec, sampler, kwargs in (("20", "ddim_sample_loop", {}), ("", "dpm_solver_sample_loop", {"num_steps": 8}),
                                  ("20", "p_sample_loop", {})):
        diffusion = create_diffusion(spec)
        guided = CFGModel(GaussianDataModel(diffusion, mu, torch.zeros(4)), cfg_scale=2.0, null_class=1,
                          guide_channels=channels)
        torch.manual_seed(0)
        out = getattr(diffusion, sampler)(guided, (2, 4, 2, 2), model_kwargs={"y": torch.zeros(2, dtype=torch.long)},
                                          clip_denoised=False, device="cpu", **kwargs)
        k = 3 if channels == 3 else 4
        expected = mu[0].clone()
        expected[:k] *= 2.0
        assert_close(out, expected.view(1, 4, 1, 1).expand_as(out), atol=1e-5, rtol=0, name=f"{sampler} {channels}")
