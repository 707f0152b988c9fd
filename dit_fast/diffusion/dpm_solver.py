"""DPM-Solver++(2M): a second-order multistep solver of the diffusion probability-flow ODE.

Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models" (2022),
Algorithm 2, in data-prediction form. With ``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)`` and the
half log-SNR ``lambda = log(alpha / sigma)``, one step from time s to time t (``h = lambda_t - lambda_s > 0``) is

    x_t = (sigma_t / sigma_s) * x_s - alpha_t * expm1(-h) * D

where ``D`` is the model's x_0 prediction at s (first order: the DDIM step) or, once a previous prediction at
time s' exists, the extrapolation ``D = (1 + 1/(2r)) x0_s - 1/(2r) x0_s'`` with ``r = h_prev / h`` (second order).

The solver here works on a discrete diffusion's own steps (``GaussianDiffusion.dpm_solver_sample_loop`` calls
it): the model is evaluated at ``num_steps`` of them, spread uniformly in lambda from the noisiest step to step 0,
and the last evaluation's x_0 prediction is the sample (a first-order step to alpha_bar = 1, exactly as the last
DDIM step).
These helpers hold only the schedule arithmetic, in float64 on the host; the per-step work on tensors is two
scalar multiply-adds.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def dpm_solver_step_indices(alphas_cumprod: np.ndarray, num_steps: int) -> list[int]:
    """``num_steps`` distinct step indices, from the noisiest (``len(alphas_cumprod) - 1``) down to 0, with
    half log-SNRs as evenly spaced as the discrete schedule allows.

    Each index is the one whose lambda is nearest to its target on the uniform lambda grid, kept strictly below
    the previous one and high enough to leave room for the rest (near step 0 the schedule's lambda steps are
    coarser than the grid, and the indices become consecutive there). Uniform lambda steps keep the multistep
    ratio ``r = h_prev / h`` near 1; time-uniform steps make r small at the end and the second-order
    extrapolation unstable.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    num_timesteps = len(alphas_cumprod)
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the diffusion's step count), got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    lambdas = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in the step index
    indices: list[int] = []
    upper = num_timesteps - 1
    for j, target in enumerate(np.linspace(lambdas[-1], lambdas[0], num_steps)):
        lower = num_steps - 1 - j
        k = lower + int(np.argmin(np.abs(lambdas[lower:upper + 1] - target)))
        indices.append(k)
        upper = k - 1
    return indices


def half_log_snr(alpha_bar: float) -> float:
    """``lambda = log(sqrt(alpha_bar) / sqrt(1 - alpha_bar))`` for alpha_bar in (0, 1)."""
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def dpm_solver_pp_2m_update(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor | None,
                            alpha_bar_s: float, alpha_bar_t: float, h_prev: float | None) -> tuple[torch.Tensor, float]:
    """One DPM-Solver++(2M) step from time s to the less noisy time t.

    Args:
        x: (N, ...) the state at time s.
        x0: (N, ...) the model's x_0 prediction at s.
        x0_prev: (N, ...) the x_0 prediction at the previous time, or None for a first-order (DDIM) step.
        alpha_bar_s, alpha_bar_t: the cumulative alphas at s and t, with ``alpha_bar_s < alpha_bar_t < 1``.
        h_prev: the log-SNR step of the previous update (required with ``x0_prev``).

    Returns:
        (x_t of x's shape, h) where ``h = lambda_t - lambda_s`` is passed on as the next call's ``h_prev``.
    """
    lambda_s, lambda_t = half_log_snr(alpha_bar_s), half_log_snr(alpha_bar_t)
    h = lambda_t - lambda_s
    if not h > 0:
        raise ValueError(f"DPM-Solver step must go towards less noise: alpha_bar {alpha_bar_s} -> {alpha_bar_t}")
    if x0_prev is None:
        d = x0
    else:
        if h_prev is None:
            raise ValueError("h_prev is required for a second-order step (x0_prev given)")
        half_inv_r = 0.5 * h / h_prev
        d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
    sigma_ratio = math.sqrt((1.0 - alpha_bar_t) / (1.0 - alpha_bar_s))
    return sigma_ratio * x - math.sqrt(alpha_bar_t) * math.expm1(-h) * d, h
