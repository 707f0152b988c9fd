"""Discrete-time Gaussian diffusion (Ho et al. 2020) with the learned-range variance of Nichol & Dhariwal (2021).

A drop-in for ``GaussianDiffusion`` of the official DiT ``diffusion/gaussian_diffusion.py``: same method names,
signatures, return dicts and fp32 numerics (schedule tables are float64 numpy arrays, gathered per timestep and
cast to float32 exactly like the official ``_extract_into_tensor``; float64 inputs keep float64). The model is
any callable ``model(x, t, **model_kwargs)`` taking x (N, C, ...) and integer timesteps t (N,) and returning
(N, C, ...) (fixed variance) or (N, 2C, ...) (learned variance: eps or x_0 channels first, then the variance
interpolation values in [-1, 1]); a tuple ``(output, extra)`` is accepted and ``extra`` passed through.

Timesteps given to the methods index this diffusion's own steps 0..num_timesteps-1 (step 0 is the least noisy).
The model is always called with the *original* step indices ``timestep_map[t]``, which differ from t only for a
respaced diffusion (see ``respace.SpacedDiffusion``).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .dpm_solver import dpm_solver_pp_2m_update, dpm_solver_step_indices

Model = Callable[..., Any]
"""``model(x (N, C, ...), t (N,) int, **model_kwargs) -> Tensor`` or ``(Tensor, extra)``."""


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps


class ModelVarType(enum.Enum):
    """The variance of p(x_{t-1} | x_t)."""

    FIXED_SMALL = enum.auto()  # the posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # exp(v log beta_t + (1 - v) log beta~_t), v = (output + 1) / 2 from the model


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # MSE on the mean target (+ VB term for learned variances)
    RESCALED_MSE = enum.auto()  # as MSE, with the VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound term alone
    RESCALED_KL = enum.auto()  # KL scaled by num_timesteps to estimate the whole bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64, shape (num_diffusion_timesteps,)) of a named schedule.

    ``"linear"``: Ho et al.'s 1e-4 .. 0.02 over 1000 steps, both ends scaled by 1000 / steps for other lengths.
    ``"squaredcos_cap_v2"``: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps,
                                   lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {schedule_name!r}; known: {', '.join(NOISE_SCHEDULES)}")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas discretizing a continuous ``alpha_bar(s)``, s in [0, 1]: ``beta_i = 1 - alpha_bar(s_{i+1}) /
    alpha_bar(s_i)`` with ``s_i = i / steps``, capped at ``max_beta``. Returns float64 (num_diffusion_timesteps,)."""
    s = np.arange(num_diffusion_timesteps + 1) / num_diffusion_timesteps
    ab = np.array([alpha_bar(float(v)) for v in s], dtype=np.float64)
    return np.minimum(1 - ab[1:] / ab[:-1], max_beta)


def _validate_model_kwargs(model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict of keyword arguments for the model, got {type(model_kwargs)}")
    return model_kwargs


def _resolve_device(model: Model, noise: torch.Tensor | None, device: torch.device | str | None) -> torch.device:
    """The sampling device: ``device``, else the noise's, else that of the model's (or bound method's owner's)
    first parameter."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    owner = getattr(model, "__self__", model)  # bound methods such as model.forward_with_cfg
    parameters = getattr(owner, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    raise ValueError("cannot infer the sampling device from the model (no parameters): pass device= or noise=")


def _final_sample(steps: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Exhaust a progressive sampling loop; its last "sample"."""
    return deque(steps, maxlen=1)[0]["sample"]


class GaussianDiffusion:
    """Training losses and samplers of a discrete Gaussian diffusion.

    Args:
        betas: 1-D sequence of betas in (0, 1], one per step, step 0 first.
        model_mean_type, model_var_type, loss_type: see the enums.
        timestep_map: for each of this diffusion's steps, the step index the model was trained with (defaults to
            the identity); ``respace.SpacedDiffusion`` sets it.
    """

    def __init__(self, *, betas: Sequence[float] | np.ndarray, model_mean_type: ModelMeanType,
                 model_var_type: ModelVarType, loss_type: LossType,
                 timestep_map: Sequence[int] | None = None) -> None:
        for value, enum_type in ((model_mean_type, ModelMeanType), (model_var_type, ModelVarType),
                                 (loss_type, LossType)):
            if not isinstance(value, enum_type):
                raise TypeError(f"expected a {enum_type.__name__}, got {value!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else [int(i) for i in timestep_map]
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {self.num_timesteps} steps")
        self._identity_map = self.timestep_map == list(range(self.num_timesteps))

        # q(x_t | x_0)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(self.one_minus_alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(self.one_minus_alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0). The posterior variance is 0 at step 0, so its log takes step 1's value there
        # (a one-step diffusion has no step 1 and uses log beta_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                                   self.posterior_variance[1:]))
        else:
            self.posterior_log_variance_clipped = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # p(x_{t-1} | x_t) variances; FIXED_LARGE takes beta~_1 at step 0 (a better decoder likelihood than beta_0)
        self.log_betas = np.log(betas)
        self.fixed_large_variance = betas.copy()
        if self.num_timesteps > 1:
            self.fixed_large_variance[0] = self.posterior_variance[1]
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """The float64 table ``name`` (or the int64 timestep map) as a tensor on ``device``, cached."""
        key = (name, device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(np.asarray(getattr(self, name))).to(device)
            self._device_tables[key] = table
        return table

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at steps t, shaped (N, 1, ..., 1) to broadcast against x (N, ...).

        Values are rounded from float64 to float32 (like the official ``_extract_into_tensor``), or kept in
        float64 when x is float64.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self._table(name, t.device)[t].to(dtype).view(-1, *([1] * (x.ndim - 1)))

    def _check_timesteps(self, t: torch.Tensor, x: torch.Tensor) -> None:
        """t must be an integer (N,) tensor on x's device with values in [0, num_timesteps).

        The range is checked for CPU tensors only: checking it on an accelerator would synchronize the host
        every call (out-of-range indices there still fail, as a device-side indexing assertion).
        """
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"timesteps must be an integer tensor of step indices, got {kind}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},) (one per batch element of x "
                             f"{tuple(x.shape)}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"timesteps are on {t.device} but x is on {x.device}")
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}] for this {self.num_timesteps}-step "
                             f"diffusion, got min {int(t.min())} max {int(t.max())}")

    def _original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The model's step indices ``timestep_map[t]``, in t's dtype."""
        if self._identity_map:
            return t
        return self._table("timestep_map", t.device)[t].to(t.dtype)

    def _run_model(self, model: Model, x: torch.Tensor, t: torch.Tensor,
                   model_kwargs: dict[str, Any] | None) -> tuple[torch.Tensor, Any]:
        """Call the model at the original step indices; returns (output, extra)."""
        output = model(x, self._original_timesteps(t), **_validate_model_kwargs(model_kwargs))
        if isinstance(output, tuple):
            return output
        return output, None

    def _split_output(self, output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model output -> (mean part (N, C, ...), variance values (N, C, ...) or None for fixed variances)."""
        n, c = x.shape[:2]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            expected = (n, 2 * c, *x.shape[2:])
            if tuple(output.shape) != expected:
                raise ValueError(f"model output has shape {tuple(output.shape)}, expected {expected}: a learned-"
                                 f"variance diffusion needs 2 * {c} output channels (eps or x_0, then variance)")
            mean_part, var_values = torch.split(output, c, dim=1)
            return mean_part, var_values
        if output.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(output.shape)}, expected x's shape {tuple(x.shape)} "
                             f"for a fixed-variance diffusion")
        return output, None

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0): (mean, variance, log_variance), each of x_start's shape (N, C, ...)."""
        self._check_timesteps(t, x_start)
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start).expand(x_start.shape).contiguous()
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand(x_start.shape).contiguous()
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given (or fresh) noise.

        x_start, noise: (N, C, ...); t: (N,) step indices. Returns (N, C, ...).
        """
        self._check_timesteps(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log variance), each of x_t's shape (N, C, ...)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        self._check_timesteps(t, x_t)
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand(x_t.shape).contiguous()
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand(x_t.shape).contiguous()
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if x_t.shape != eps.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != x_t shape {tuple(x_t.shape)}")
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
                                 ) -> torch.Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def _p_mean_variance_from_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                                     clip_denoised: bool,
                                     denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None
                                     ) -> dict[str, torch.Tensor]:
        mean_part, var_values = self._split_output(output, x)
        if var_values is not None:
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_values + 1) / 2  # the model's [-1, 1] spans [beta~_t, beta_t] in log space
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            var_name, log_var_name = (("fixed_large_variance", "fixed_large_log_variance")
                                      if self.model_var_type == ModelVarType.FIXED_LARGE
                                      else ("posterior_variance", "posterior_log_variance_clipped"))
            variance = self._extract(var_name, t, x).expand(x.shape).contiguous()
            log_variance = self._extract(log_var_name, t, x).expand(x.shape).contiguous()

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = mean_part
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, mean_part)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Apply the model to get p(x_{t-1} | x_t) and its prediction of x_0.

        Args:
            model: see the module docstring.
            x: (N, C, ...) samples at step t.
            t: (N,) step indices of this diffusion.
            clip_denoised: clamp the x_0 prediction to [-1, 1] (after ``denoised_fn``).
            denoised_fn: optional map applied to the x_0 prediction.
            model_kwargs: extra keyword arguments of the model (e.g. ``{"y": labels}``).

        Returns:
            dict with "mean", "variance", "log_variance", "pred_xstart" (each (N, C, ...)) and "extra" (the
            second element of a tuple model output, else None).
        """
        self._check_timesteps(t, x)
        output, extra = self._run_model(model, x, t, model_kwargs)
        out: dict[str, Any] = self._p_mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)
        out["extra"] = extra
        return out

    def condition_mean(self, cond_fn: Model, p_mean_var: dict[str, Any], x: torch.Tensor, t: torch.Tensor,
                       model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """Shift the mean by ``variance * cond_fn(x, t)`` (Sohl-Dickstein et al.), cond_fn giving
        grad log p(y | x) of shape (N, C, ...). Returns the new mean in float32."""
        gradient = cond_fn(x, self._original_timesteps(t), **_validate_model_kwargs(model_kwargs))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn: Model, p_mean_var: dict[str, Any], x: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """``p_mean_variance``'s output as if the score were conditioned by cond_fn (Song et al.'s method):
        eps <- eps - sqrt(1 - abar_t) * cond_fn(x, t)."""
        alpha_bar = self._extract("alphas_cumprod", t, x)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._original_timesteps(t),
                                                     **_validate_model_kwargs(model_kwargs))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def p_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, cond_fn: Model | None = None,
                 model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Sample x_{t-1} ~ p(x_{t-1} | x_t) (no noise where t == 0).

        Returns dict "sample" (N, C, ...) and "pred_xstart" (N, C, ...).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, cond_fn: Model | None = None,
                    model_kwargs: dict[str, Any] | None = None, eta: float = 0.0) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like.

        Returns dict "sample" (N, C, ...) and "pred_xstart" (N, C, ...).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # re-derived: also right for x_0 models
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)  # drawn even for eta = 0 to keep the official random stream
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                            denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            cond_fn: Model | None = None, model_kwargs: dict[str, Any] | None = None,
                            eta: float = 0.0) -> dict[str, torch.Tensor]:
        """One deterministic DDIM inversion step x_t -> x_{t+1} (eta must be 0).

        Returns dict "sample" (N, C, ...) and "pred_xstart" (N, C, ...).
        """
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is deterministic (eta = 0 only), got eta={eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------ sampling loops

    def _loop_progressive(self, step: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                          model: Model, shape: Sequence[int], noise: torch.Tensor | None,
                          device: torch.device | str | None, progress: bool,
                          indices: Iterable[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Run ``step(x, t)`` over ``indices`` (default: every step, noisiest first) from x_T = noise or N(0, I)."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list like (N, C, H, W), got {type(shape).__name__}")
        device = _resolve_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            x = noise
        else:
            x = torch.randn(*shape, device=device)
        steps = list(range(self.num_timesteps))[::-1] if indices is None else list(indices)
        if progress:
            steps = tqdm(steps)
        for i in steps:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]

    def p_sample_loop(self, model: Model, shape: Sequence[int], noise: torch.Tensor | None = None,
                      clip_denoised: bool = True, denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      cond_fn: Model | None = None, model_kwargs: dict[str, Any] | None = None,
                      device: torch.device | str | None = None, progress: bool = False) -> torch.Tensor:
        """Ancestral (DDPM) sampling over every step of this diffusion; returns samples of ``shape`` (N, C, ...).

        ``noise`` is x_T (default N(0, I)); ``device`` defaults to noise's, else the model's; ``progress`` shows a
        tqdm bar. The loop runs without gradients.
        """
        return _final_sample(self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress))

    def p_sample_loop_progressive(self, model: Model, shape: Sequence[int], noise: torch.Tensor | None = None,
                                  clip_denoised: bool = True,
                                  denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                  cond_fn: Model | None = None, model_kwargs: dict[str, Any] | None = None,
                                  device: torch.device | str | None = None,
                                  progress: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """As ``p_sample_loop``, yielding each step's ``p_sample`` dict ("sample", "pred_xstart")."""
        def step(x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.p_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                                 model_kwargs=model_kwargs)

        yield from self._loop_progressive(step, model, shape, noise, device, progress)

    def ddim_sample_loop(self, model: Model, shape: Sequence[int], noise: torch.Tensor | None = None,
                         clip_denoised: bool = True, denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         cond_fn: Model | None = None, model_kwargs: dict[str, Any] | None = None,
                         device: torch.device | str | None = None, progress: bool = False,
                         eta: float = 0.0) -> torch.Tensor:
        """DDIM sampling over every step of this diffusion (respace it, e.g. ``create_diffusion("ddim50")``, for
        fewer steps); arguments as ``p_sample_loop``. Returns samples of ``shape``."""
        return _final_sample(self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta))

    def ddim_sample_loop_progressive(self, model: Model, shape: Sequence[int], noise: torch.Tensor | None = None,
                                     clip_denoised: bool = True,
                                     denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                     cond_fn: Model | None = None, model_kwargs: dict[str, Any] | None = None,
                                     device: torch.device | str | None = None, progress: bool = False,
                                     eta: float = 0.0) -> Iterator[dict[str, torch.Tensor]]:
        """As ``ddim_sample_loop``, yielding each step's ``ddim_sample`` dict ("sample", "pred_xstart")."""
        def step(x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.ddim_sample(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta)

        yield from self._loop_progressive(step, model, shape, noise, device, progress)

    def dpm_solver_sample_loop(self, model: Model, shape: Sequence[int], noise: torch.Tensor | None = None,
                               clip_denoised: bool = True,
                               denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                               cond_fn: Model | None = None, model_kwargs: dict[str, Any] | None = None,
                               device: torch.device | str | None = None, progress: bool = False,
                               num_steps: int = 20) -> torch.Tensor:
        """DPM-Solver++(2M) sampling (deterministic, second order; see ``dpm_solver``) with ``num_steps`` model
        evaluations at steps of this diffusion spread uniformly in log-SNR, from the noisiest to step 0. Use it
        on the full diffusion (``create_diffusion("")``): its 1000 steps give the finest choice of steps.
        ``clip_denoised``, ``denoised_fn`` and ``cond_fn`` (Song et al.'s score conditioning) act on each x_0
        prediction; other arguments as ``p_sample_loop``. Returns samples of ``shape``."""
        return _final_sample(self.dpm_solver_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, num_steps=num_steps))

    def dpm_solver_sample_loop_progressive(self, model: Model, shape: Sequence[int],
                                           noise: torch.Tensor | None = None, clip_denoised: bool = True,
                                           denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                           cond_fn: Model | None = None, model_kwargs: dict[str, Any] | None = None,
                                           device: torch.device | str | None = None, progress: bool = False,
                                           num_steps: int = 20) -> Iterator[dict[str, torch.Tensor]]:
        """As ``dpm_solver_sample_loop``, yielding after each model evaluation a dict "sample" (the state at the
        next evaluated step; the final sample after the last) and "pred_xstart"."""
        indices = dpm_solver_step_indices(self.alphas_cumprod, num_steps)
        # (this step, the next one or None after the last)
        transitions = iter(zip(indices, [*indices[1:], None], strict=True))
        history: dict[str, Any] = {"x0": None, "h": None}

        def step(x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       model_kwargs=model_kwargs)
            if cond_fn is not None:
                out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
            x0 = out["pred_xstart"]
            s, s_next = next(transitions)
            if s_next is None:  # the last evaluation: a first-order step to alpha_bar = 1 lands on x_0
                return {"sample": x0, "pred_xstart": x0}
            sample, h = dpm_solver_pp_2m_update(x, x0, history["x0"], float(self.alphas_cumprod[s]),
                                                float(self.alphas_cumprod[s_next]), history["h"])
            history["x0"], history["h"] = x0, h
            return {"sample": sample, "pred_xstart": x0}

        yield from self._loop_progressive(step, model, shape, noise, device, progress, indices=indices)

    # ------------------------------------------------------------------ losses and likelihood

    def _vb_terms_from_output(self, output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                              t: torch.Tensor, clip_denoised: bool) -> dict[str, torch.Tensor]:
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(output, x_t, t, clip_denoised, None)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        # step 0 scores the decoder NLL, every other step KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def _vb_terms_bpd(self, model: Model, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      clip_denoised: bool = True, model_kwargs: dict[str, Any] | None = None
                      ) -> dict[str, torch.Tensor]:
        """One term of the variational bound, in bits per dimension.

        Returns dict "output" (N,) (decoder NLL where t == 0, else the KL term) and "pred_xstart" (N, C, ...).
        """
        self._check_timesteps(t, x_t)
        output, _ = self._run_model(model, x_t, t, model_kwargs)
        return self._vb_terms_from_output(output, x_start, x_t, t, clip_denoised)

    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict[str, Any] | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example training losses at steps t.

        Args:
            x_start: (N, C, ...) clean data; t: (N,) step indices; noise: (N, C, ...) (default fresh N(0, I)).

        Returns:
            dict of (N,) tensors: "loss"; for MSE losses also "mse" (on eps or x_0) and, with learned variances,
            "vb" (the bound term in bits/dim, through the variance channels only: the mean is detached; scaled
            by num_timesteps / 1000 for RESCALED_MSE). "loss" = "mse" + "vb".
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        if self.loss_type.is_vb():
            loss = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}

        output, _ = self._run_model(model, x_t, t, model_kwargs)
        mean_part, var_values = self._split_output(output, x_t)
        terms: dict[str, torch.Tensor] = {}
        if var_values is not None:
            # Learn the variance through the bound without letting it move the mean prediction.
            frozen = torch.cat([mean_part.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_from_output(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        terms["mse"] = mean_flat((target - mean_part) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (N,)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model: Model, x_start: torch.Tensor, clip_denoised: bool = True,
                      model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The whole variational bound in bits per dimension (one fresh noise draw per step).

        Returns dict "total_bpd" (N,), "prior_bpd" (N,), and per step (N, T): "vb", "xstart_mse", "mse".
        """
        n = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, dtype=torch.long, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        prior_bpd = self._prior_bpd(x_start)
        vb_all = torch.stack(vb, dim=1)
        return {"total_bpd": vb_all.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb_all,
                "xstart_mse": torch.stack(xstart_mse, dim=1), "mse": torch.stack(mse, dim=1)}
