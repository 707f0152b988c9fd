"""Gaussian log-densities and divergences used by the variational bound.

Same numerics as the official DiT ``diffusion/diffusion_utils.py`` (itself from OpenAI's improved-diffusion):
in particular the discretized log-likelihood uses the tanh approximation of the normal CDF, so that bits-per-dim
values match the published code bit for bit in fp32.
"""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor | float, logvar1: torch.Tensor | float,
              mean2: torch.Tensor | float, logvar2: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other; at least one must be a tensor (it sets dtype and device of the
    scalar ones).
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl: at least one argument must be a torch.Tensor")
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(ref) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF via ``0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`` (max abs error ~2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of 8-bit data under a Gaussian discretized to bins of width 2/255.

    ``x`` holds uint8 values rescaled to [-1, 1]; the outermost bins extend to -inf / +inf.
    All three tensors have the same shape (N, ...); so has the result.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"discretized_gaussian_log_likelihood: shapes differ: x {tuple(x.shape)}, "
                         f"means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
