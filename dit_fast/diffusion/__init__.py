"""Gaussian diffusion with learned sigma (the DiT paper's diffusion), a drop-in for the official ``diffusion``.

    from dit_fast.diffusion import create_diffusion, CFGModel

    diffusion = create_diffusion("")                        # 1000 steps, for training
    loss = diffusion.training_losses(model, x0, t, dict(y=y))["loss"].mean()

    sampler = create_diffusion("250")                       # 250 respaced DDPM steps (the paper's sampler)
    guided = CFGModel(model, cfg_scale=1.5, null_class=1000)
    z = sampler.p_sample_loop(guided, (n, 4, 32, 32), clip_denoised=False, model_kwargs=dict(y=y), device="cuda")
    z = sampler.ddim_sample_loop(...)                       # DDIM over the respaced steps
    z = create_diffusion("").dpm_solver_sample_loop(..., num_steps=20)  # DPM-Solver++(2M), 20 evaluations

Flow matching (SiT's objective on the same network; ``flow``, ``flow_sampling``, ``time_sampling``)::

    transport = create_transport("Linear", "velocity")     # SiT's paths, predictions, loss weightings
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    z = FlowSampler(transport).sample(guided, noise, dict(y=y), sampler="ode-heun", num_steps=26)  # 50 NFE

The model is any callable ``model(x, t, **model_kwargs)``; it always receives the original timestep indices
0..diffusion_steps-1, whatever the respacing.
"""

from __future__ import annotations

from collections.abc import Sequence

from .diffusion_utils import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .flow import LOSS_WEIGHTS, PATHS, PREDICTIONS, Transport, create_transport
from .flow_sampling import DIFFUSION_FORMS, FLOW_SAMPLERS, LAST_STEPS, FlowSampler, flow_nfe
from .gaussian_diffusion import (
    NOISE_SCHEDULES,
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    betas_for_alpha_bar,
    get_named_beta_schedule,
)
from .guidance import CFGModel
from .respace import SpacedDiffusion, space_timesteps
from .time_sampling import TimeSampling

__all__ = [
    "DIFFUSION_FORMS",
    "FLOW_SAMPLERS",
    "LAST_STEPS",
    "LOSS_WEIGHTS",
    "NOISE_SCHEDULES",
    "PATHS",
    "PREDICTIONS",
    "CFGModel",
    "FlowSampler",
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "TimeSampling",
    "Transport",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "create_diffusion",
    "create_transport",
    "discretized_gaussian_log_likelihood",
    "flow_nfe",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]


def create_diffusion(timestep_respacing: str | Sequence[int] | None, noise_schedule: str = "linear",
                     use_kl: bool = False, sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> SpacedDiffusion:
    """The DiT diffusion, with the official ``create_diffusion``'s arguments and defaults.

    Args:
        timestep_respacing: "" or None (all ``diffusion_steps`` steps), a step count such as "250", section counts
            "10,15,20" (or a list), or "ddimN"; see ``space_timesteps``.
        noise_schedule: "linear" or "squaredcos_cap_v2".
        use_kl: train on the variational bound alone (RESCALED_KL).
        sigma_small: with ``learn_sigma=False``, use the posterior variance (else beta_t).
        predict_xstart: the model predicts x_0 instead of eps.
        learn_sigma: the model outputs 2C channels, the last C interpolating the log variance (LEARNED_RANGE).
        rescale_learned_sigmas: RESCALED_MSE (VB term times num_timesteps / 1000) instead of MSE. The official
            default is False; for the 1000-step training diffusion both are the same.
        diffusion_steps: steps of the base process.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
