"""Flow matching / stochastic interpolants (SiT, Ma et al. 2024): the objective of a DiT trained as a flow model.

A path joins noise x0 ~ N(0, I) (time t = 0) to data x1 (t = 1): ``x_t = alpha_t x1 + sigma_t x0`` with velocity
``u_t = alpha'_t x1 + sigma'_t x0``. Paths (SiT's names): ``Linear`` (alpha = t, sigma = 1 - t: rectified flow),
``GVP`` (alpha = sin(pi t / 2), sigma = cos(pi t / 2)) and ``VP`` (the variance-preserving SDE of score-based
diffusion, beta from 0.1 to 20). The network, unchanged from DiT, sees ``t`` in [0, 1] and predicts the velocity
(the default), the score ``-x0 / sigma_t`` or the noise ``x0``; ``Transport.training_losses`` is SiT's
``Transport.training_losses`` (MSE on the velocity; for score and noise an optional ``velocity`` or ``likelihood``
weighting), ``drift`` the probability-flow ODE's velocity and ``score`` the score, from any prediction.

Times avoid the singular ends as in SiT: ``train_eps`` / ``sample_eps`` default to 0 for velocity prediction on
Linear and GVP (stable everywhere), 1e-3 for score / noise prediction (t in [eps, 1 - eps]) and, for VP, 1e-5
(training) and 1e-3 (sampling). Unlike SiT, an explicitly given eps is always used (SiT ignores it for velocity
prediction, where an SDE with the ``SBDM`` diffusion then divides by zero at t = 0).

Learned sigma has no meaning here: flow models are built with ``learn_sigma=False`` (C output channels). A network
with 2C output channels (an official SiT-XL/2 checkpoint is stored with DiT's 8-channel final layer) has its
second half dropped, exactly as SiT's ``forward`` does (``model_output``); the dropped half gets no gradient.

    transport = create_transport("Linear", "velocity")
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    x = FlowSampler(transport).sample_ode(guided_model, z, dict(y=y), method="heun", num_steps=26)  # flow_sampling

The samplers are in ``flow_sampling``; ``time_sampling`` draws training times (uniform or logit-normal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .diffusion_utils import mean_flat
from .time_sampling import TimeSampling

__all__ = ["PATHS", "PREDICTIONS", "LOSS_WEIGHTS", "FlowPath", "GVPPath", "LinearPath", "Transport", "VPPath",
           "create_transport", "expand_t_like_x", "model_output"]

PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (N,) -> (N, 1, ..., 1), broadcastable against x (N, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class FlowPath:
    """An interpolation path ``x_t = alpha_t x1 + sigma_t x0``; methods take t already shaped like x."""

    def alpha(self, t: torch.Tensor) -> tuple[Any, Any]:
        """(alpha_t, d alpha_t / dt)."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> tuple[Any, Any]:
        """(sigma_t, d sigma_t / dt)."""
        raise NotImplementedError

    def alpha_ratio(self, t: torch.Tensor) -> Any:
        """alpha'_t / alpha_t, in a numerically stable form."""
        raise NotImplementedError

    def drift_coefficients(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(f, g2): the linear drift ``f(x, t)`` of the forward SDE (in SiT's sign: the probability-flow velocity is
        ``-f + g2 * score``) and its squared diffusion ``g2`` (SiT's ``compute_drift``)."""
        ratio = self.alpha_ratio(t)
        sigma_t, d_sigma_t = self.sigma(t)
        return -(ratio * x), ratio * sigma_t ** 2 - sigma_t * d_sigma_t

    def score_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score implied by a velocity prediction at (x, t)."""
        alpha_t, d_alpha_t = self.alpha(t)
        sigma_t, d_sigma_t = self.sigma(t)
        reverse_ratio = alpha_t / d_alpha_t
        var = sigma_t ** 2 - reverse_ratio * d_sigma_t * sigma_t
        return (reverse_ratio * velocity - x) / var


class LinearPath(FlowPath):
    """alpha_t = t, sigma_t = 1 - t (SiT's ``Linear``; rectified flow / flow matching with the OT path)."""

    def alpha(self, t: torch.Tensor) -> tuple[Any, Any]:
        return t, 1

    def sigma(self, t: torch.Tensor) -> tuple[Any, Any]:
        return 1 - t, -1

    def alpha_ratio(self, t: torch.Tensor) -> Any:
        return 1 / t


class GVPPath(FlowPath):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (SiT's ``GVP``: generalised variance preserving)."""

    def alpha(self, t: torch.Tensor) -> tuple[Any, Any]:
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t: torch.Tensor) -> tuple[Any, Any]:
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def alpha_ratio(self, t: torch.Tensor) -> Any:
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(FlowPath):
    """The VP SDE path (SiT's ``VP``): log alpha_t = -(1 - t)^2 (b_max - b_min) / 4 - (1 - t) b_min / 2,
    sigma_t = sqrt(1 - alpha_t^2), with b_min = 0.1, b_max = 20."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def _log_mean(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * ((1 - t) ** 2) * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def _d_log_mean(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t: torch.Tensor) -> tuple[Any, Any]:
        alpha_t = torch.exp(self._log_mean(t))
        return alpha_t, alpha_t * self._d_log_mean(t)

    def sigma(self, t: torch.Tensor) -> tuple[Any, Any]:
        p_sigma_t = 2 * self._log_mean(t)
        sigma_t = torch.sqrt(1 - torch.exp(p_sigma_t))
        return sigma_t, torch.exp(p_sigma_t) * (2 * self._d_log_mean(t)) / (-2 * sigma_t)

    def alpha_ratio(self, t: torch.Tensor) -> Any:
        return self._d_log_mean(t)

    def drift_coefficients(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


PATHS: dict[str, type[FlowPath]] = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}


def model_output(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                 model_kwargs: dict[str, Any]) -> torch.Tensor:
    """``model(x, t, **model_kwargs)`` with x's C channels: a 2C-channel (learned-sigma) output loses its second
    half, as SiT's ``forward`` drops it."""
    out = model(x, t, **model_kwargs)
    channels = x.shape[1]
    if out.shape[1] == 2 * channels:
        out = out[:, :channels]
    if out.shape != x.shape:
        raise ValueError(f"flow model output {tuple(out.shape)} does not match its input {tuple(x.shape)} (or twice "
                         "its channels, learned sigma)")
    return out


@dataclass(frozen=True)
class Transport:
    """A flow-matching objective: a path, what the network predicts, the loss weighting and the end-point eps.

    Build it with ``create_transport`` (which fills SiT's eps defaults). ``time_sampling`` draws training times.
    """

    path_type: str = "Linear"
    prediction: str = "velocity"
    loss_weight: str = "none"
    train_eps: float = 0.0
    sample_eps: float = 0.0
    time_sampling: TimeSampling = TimeSampling()

    def __post_init__(self) -> None:
        if self.path_type not in PATHS:
            raise ValueError(f"unknown flow path {self.path_type!r}; choose one of {', '.join(PATHS)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss weight {self.loss_weight!r}; choose one of {', '.join(LOSS_WEIGHTS)}")
        for name in ("train_eps", "sample_eps"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)}")

    @property
    def path(self) -> FlowPath:
        return PATHS[self.path_type]()

    def interval(self, *, sampling: bool = False, sde: bool = False, diffusion_form: str = "SBDM",
                 last_step_size: float = 0.0) -> tuple[float, float]:
        """The time range (t0, t1) used for training, or for an ODE / SDE sampler (SiT's ``check_interval``)."""
        eps = self.sample_eps if sampling else self.train_eps
        t0, t1 = 0.0, 1.0
        t1_trimmed = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if self.path_type == "VP":
            t1 = t1_trimmed
        elif self.prediction != "velocity" or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0.0
            t1 = t1_trimmed
        return t0, t1

    def sample_time(self, n: int, *, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """Training times (n,) float32 in the training interval, drawn by ``time_sampling`` (t = 0 is noise)."""
        t0, t1 = self.interval()
        return self.time_sampling.flow_times(n, t0, t1, generator=generator, device=device)

    def training_losses(self, model: Callable[..., torch.Tensor], x1: torch.Tensor,
                        model_kwargs: dict[str, Any] | None = None, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """SiT's training loss per sample.

        Args:
            model: ``model(x_t, t, **model_kwargs)`` with x_t (N, C, ...) and t (N,) in [0, 1].
            x1: (N, C, ...) data (scaled latents or pixels).
            t: (N,) times; default: ``sample_time`` (with ``generator``).
            noise: (N, C, ...) the x0 ~ N(0, I) end; default: drawn with ``generator``.

        Returns:
            {"loss": (N,), "pred": the network's (C-channel) output (N, C, ...)}.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if t is None:
            t = self.sample_time(x1.shape[0], generator=generator, device=x1.device)
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        t = t.to(x1)
        path, te = self.path, expand_t_like_x(t, x1)
        alpha_t, d_alpha_t = path.alpha(te)
        sigma_t, d_sigma_t = path.sigma(te)
        xt = alpha_t * x1 + sigma_t * noise
        ut = d_alpha_t * x1 + d_sigma_t * noise
        out = model_output(model, xt, t, model_kwargs)
        if self.prediction == "velocity":
            return {"loss": mean_flat((out - ut) ** 2), "pred": out}
        _, drift_var = path.drift_coefficients(xt, te)
        weight: Any = {"none": 1, "velocity": (drift_var / sigma_t) ** 2,
                       "likelihood": drift_var / (sigma_t ** 2)}[self.loss_weight]
        if self.prediction == "noise":
            return {"loss": mean_flat(weight * ((out - noise) ** 2)), "pred": out}
        return {"loss": mean_flat(weight * ((out * sigma_t + noise) ** 2)), "pred": out}

    def drift_and_score(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(probability-flow velocity, score) at (x (N, C, ...), t (N,)) from the network's output ``out``."""
        path, te = self.path, expand_t_like_x(t, x)
        if self.prediction == "velocity":
            return out, path.score_from_velocity(out, x, te)
        score = out if self.prediction == "score" else out / -path.sigma(te)[0]
        drift_mean, drift_var = path.drift_coefficients(x, te)
        return -drift_mean + drift_var * score, score

    def drift(self, model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
              model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """The probability-flow ODE's velocity dx/dt at (x, t), one network evaluation (SiT's ``get_drift``)."""
        return self.drift_and_score(model_output(model, x, t, model_kwargs or {}), x, t)[0]

    def score(self, model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
              model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """The score grad log p_t(x), one network evaluation (SiT's ``get_score``)."""
        return self.drift_and_score(model_output(model, x, t, model_kwargs or {}), x, t)[1]

    def to_dict(self) -> dict[str, Any]:
        """The settings, JSON-able (what checkpoints store)."""
        return {"path_type": self.path_type, "prediction": self.prediction, "loss_weight": self.loss_weight,
                "train_eps": self.train_eps, "sample_eps": self.sample_eps, "time_sampling": self.time_sampling.spec}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transport:
        """The transport of ``to_dict``'s output (a checkpoint's ``{"name": "flow", ...}`` objective included)."""
        if d.get("name", "flow") != "flow":
            raise ValueError(f"not a flow objective: {d!r}")
        settings = {k: v for k, v in d.items() if k != "name"}
        return cls(**{**settings, "time_sampling": TimeSampling.parse(settings.get("time_sampling", "uniform"))})


def create_transport(path_type: str = "Linear", prediction: str = "velocity", loss_weight: str | None = None,
                     train_eps: float | None = None, sample_eps: float | None = None,
                     time_sampling: str | TimeSampling = "uniform") -> Transport:
    """SiT's ``create_transport``: unset eps take SiT's defaults (0 for velocity on Linear/GVP; 1e-3 for score or
    noise prediction; VP: 1e-5 training, 1e-3 sampling). ``loss_weight`` None is "none"."""
    if path_type == "VP":
        default_train, default_sample = 1e-5, 1e-3
    elif prediction != "velocity":
        default_train, default_sample = 1e-3, 1e-3
    else:
        default_train, default_sample = 0.0, 0.0
    if isinstance(time_sampling, str):
        time_sampling = TimeSampling.parse(time_sampling)
    return Transport(path_type=path_type, prediction=prediction, loss_weight=loss_weight or "none",
                     train_eps=default_train if train_eps is None else float(train_eps),
                     sample_eps=default_sample if sample_eps is None else float(sample_eps),
                     time_sampling=time_sampling)
