"""Samplers of flow models (SiT's): the probability-flow ODE (Euler, Heun, adaptive dopri5) and the SDE
(Euler-Maruyama), from noise at t = t0 to data at t = 1.

``num_steps`` counts time points as in SiT's ``Sampler``: ``linspace(t0, t1, num_steps)``, so

- ``ode-euler``: num_steps - 1 steps, one network evaluation each (NFE = num_steps - 1);
- ``ode-heun``: Heun's second-order method (torchdiffeq's ``heun2``, which SiT's ``--sampling-method heun2``
  calls): two evaluations per step (NFE = 2 (num_steps - 1)): ``k1 = v(t, x)``, ``k2 = v(t + dt, x + dt k1)``,
  ``x += dt (k1 + k2) / 2``;
- ``ode-dopri5``: torchdiffeq's adaptive Dormand-Prince (SiT's default ODE sampler, ``atol``/``rtol``), the NFE
  chosen by the solver; needs ``pip install torchdiffeq``;
- ``sde``: Euler-Maruyama over [t0, t1 = 1 - last_step_size] with SiT's constant step ``dt = t[1] - t[0]``:
  ``x += (v + D(t) score) dt + sqrt(2 D(t) dt) z``, then one last step to t = 1 (``Mean``: the drift step without
  noise; ``Tweedie``: the posterior mean ``(x + sigma^2 score) / alpha``; ``Euler``: the ODE's step; None: none):
  NFE = num_steps - 1 (+ 1 for the last step). ``D`` is the diffusion coefficient, SiT's forms: ``SBDM`` (the
  score-based model's own g^2 / 2), ``sigma`` (norm sigma_t, SiT's command-line default), ``linear``
  (norm (1 - t)), ``constant`` (norm; in SiT this form fails), ``decreasing`` ((norm cos(pi t) + 1)^2 / 4) and
  ``increasing-decreasing`` (norm sin(pi t)^2; misspelt, hence unusable, in SiT).

One network evaluation per step: where SiT's SDE calls the network twice on the same input (drift, then score),
both come here from one output. The noise of each SDE step is ``randn(x.shape, generator)`` on the CPU (the global
RNG when ``generator`` is None, which with SiT's seeding reproduces SiT's draws). Classifier-free guidance is the
model's business: pass a ``CFGModel`` (which guides the network's output, the velocity, as SiT's
``forward_with_cfg``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from .flow import Transport, expand_t_like_x, model_output

__all__ = ["DIFFUSION_FORMS", "FLOW_SAMPLERS", "LAST_STEPS", "FlowSampler", "flow_nfe"]

FLOW_SAMPLERS = ("ode-euler", "ode-heun", "ode-dopri5", "sde")
DIFFUSION_FORMS = ("SBDM", "sigma", "linear", "constant", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


def flow_nfe(sampler: str, num_steps: int, last_step: str | None = "Mean") -> int | None:
    """Network evaluations of one run of ``sampler`` with ``num_steps`` time points (None: adaptive dopri5)."""
    if sampler == "ode-euler":
        return num_steps - 1
    if sampler == "ode-heun":
        return 2 * (num_steps - 1)
    if sampler == "sde":
        return num_steps - 1 + (last_step is not None)
    if sampler == "ode-dopri5":
        return None
    raise ValueError(f"unknown flow sampler {sampler!r}; choose one of {', '.join(FLOW_SAMPLERS)}")


class FlowSampler:
    """ODE and SDE samplers of a ``Transport``; ``model(x, t, **model_kwargs)`` with t (N,) in [0, 1]."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def _evaluate(self, model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                  model_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ODE velocity, score) at (x, t): one network evaluation; t is a 0-dim or (N,) time."""
        t = torch.ones(x.shape[0], device=x.device, dtype=x.dtype) * t
        return self.transport.drift_and_score(model_output(model, x, t, model_kwargs), x, t)

    def sample_ode(self, model: Callable[..., torch.Tensor], z: torch.Tensor,
                   model_kwargs: dict[str, Any] | None = None, *, method: str = "heun", num_steps: int = 50,
                   atol: float = 1e-6, rtol: float = 1e-3, progress: bool = False,
                   trajectory: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Integrate the probability-flow ODE from noise ``z`` (N, C, ...) at t0 to t1 (SiT's ``sample_ode``).

        ``method``: "euler", "heun" or "dopri5" (adaptive: ``num_steps`` are only the times reported). Returns
        the sample at t1, or with ``trajectory`` the states at all ``num_steps`` times (the first is ``z``).
        """
        if num_steps < 2:
            raise ValueError(f"an ODE sampler needs num_steps >= 2 time points, got {num_steps}")
        kwargs = model_kwargs or {}
        t0, t1 = self.transport.interval(sampling=True)
        ts = torch.linspace(t0, t1, num_steps).to(z.device)
        if method == "dopri5":
            states = _dopri5(lambda t, x: self._evaluate(model, x, t, kwargs)[0], z, ts, atol, rtol)
            return states if trajectory else states[-1]
        if method not in ("euler", "heun"):
            raise ValueError(f"unknown ODE method {method!r}; choose euler, heun or dopri5")
        x, states = z, [z]
        for k in tqdm(range(num_steps - 1), desc=f"ode-{method}", disable=not progress):
            dt = ts[k + 1] - ts[k]
            k1 = self._evaluate(model, x, ts[k], kwargs)[0]
            if method == "euler":
                x = x + dt * k1
            else:
                k2 = self._evaluate(model, x + dt * k1, ts[k] + dt, kwargs)[0]
                x = x + dt * (k1 * 0.5 + k2 * 0.5)
            states.append(x)
        return states if trajectory else x

    def diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str = "sigma", norm: float = 1.0) -> Any:
        """The SDE's diffusion coefficient D(t) (SiT's ``compute_diffusion``), t shaped like x."""
        path = self.transport.path
        if form == "SBDM":
            return norm * path.drift_coefficients(x, t)[1]
        if form == "sigma":
            return norm * path.sigma(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")

    def _sde_drift(self, model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                   kwargs: dict[str, Any], form: str, norm: float) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """(v + D score, D, the ODE velocity v) at (x, t (N,)): one network evaluation."""
        drift, score = self._evaluate(model, x, t, kwargs)
        diffusion = self.diffusion(x, expand_t_like_x(t, x), form, norm)
        return drift + diffusion * score, diffusion, drift

    def sample_sde(self, model: Callable[..., torch.Tensor], z: torch.Tensor,
                   model_kwargs: dict[str, Any] | None = None, *, num_steps: int = 250,
                   diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step: str | None = "Mean",
                   last_step_size: float = 0.04, generator: torch.Generator | None = None, progress: bool = False,
                   trajectory: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Euler-Maruyama from noise ``z`` (N, C, ...) (SiT's ``sample_sde``, sampling method Euler).

        Returns the sample, or with ``trajectory`` the ``num_steps`` states after each step (the last one after
        the last step), as SiT's sampler returns them.
        """
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last step {last_step!r}; choose Mean, Tweedie, Euler or None")
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion form {diffusion_form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")
        if num_steps < 2:
            raise ValueError(f"the SDE sampler needs num_steps >= 2 time points, got {num_steps}")
        kwargs = model_kwargs or {}
        last_step_size = 0.0 if last_step is None else last_step_size
        t0, t1 = self.transport.interval(sampling=True, sde=True, diffusion_form=diffusion_form,
                                         last_step_size=last_step_size)
        ts = torch.linspace(t0, t1, num_steps)
        dt = ts[1] - ts[0]
        x, states = z, []
        for ti in tqdm(ts[:-1], desc="sde", disable=not progress):
            w = torch.randn(x.shape, generator=generator).to(x)
            t = torch.ones(x.shape[0]).to(x) * ti
            sde_drift, diffusion, _ = self._sde_drift(model, x, t, kwargs, diffusion_form, diffusion_norm)
            mean_x = x + sde_drift * dt
            x = mean_x + torch.sqrt(2 * diffusion) * (w * torch.sqrt(dt))
            states.append(x)
        x = self._last_step(model, x, t1, kwargs, last_step, last_step_size, diffusion_form, diffusion_norm)
        states.append(x)
        return states if trajectory else x

    def _last_step(self, model: Callable[..., torch.Tensor], x: torch.Tensor, t1: float, kwargs: dict[str, Any],
                   last_step: str | None, size: float, form: str, norm: float) -> torch.Tensor:
        """The SDE's final step from t1 to 1 (see the module docstring)."""
        if last_step is None:
            return x
        t = torch.ones(x.shape[0], device=x.device) * t1
        if last_step == "Mean":
            return x + self._sde_drift(model, x, t, kwargs, form, norm)[0] * size
        drift, score = self._evaluate(model, x, t, kwargs)
        if last_step == "Euler":
            return x + drift * size
        path, te = self.transport.path, expand_t_like_x(t, x)
        alpha_t, sigma_t = path.alpha(te)[0], path.sigma(te)[0]
        return x / alpha_t + (sigma_t ** 2) / alpha_t * score

    def sample(self, model: Callable[..., torch.Tensor], z: torch.Tensor, model_kwargs: dict[str, Any] | None = None,
               *, sampler: str = "ode-heun", num_steps: int = 50, progress: bool = False,
               **options: Any) -> torch.Tensor:
        """One of ``FLOW_SAMPLERS`` by name; ``options`` go to ``sample_ode`` / ``sample_sde``."""
        if sampler == "sde":
            return self.sample_sde(model, z, model_kwargs, num_steps=num_steps, progress=progress, **options)
        if sampler in FLOW_SAMPLERS:
            return self.sample_ode(model, z, model_kwargs, method=sampler[len("ode-"):], num_steps=num_steps,
                                   progress=progress, **options)
        raise ValueError(f"unknown flow sampler {sampler!r}; choose one of {', '.join(FLOW_SAMPLERS)}")


def _dopri5(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor, ts: torch.Tensor,
            atol: float, rtol: float) -> list[torch.Tensor]:
    """torchdiffeq's adaptive dopri5 through the times ``ts`` (SiT's ODE sampler); ImportError with the install
    hint when torchdiffeq is missing."""
    try:
        torchdiffeq = importlib.import_module("torchdiffeq")
    except ImportError:
        raise ImportError("the ode-dopri5 sampler needs torchdiffeq (pip install torchdiffeq); ode-heun and "
                          "ode-euler need nothing extra") from None
    return list(torchdiffeq.odeint(velocity, z, ts, method="dopri5", atol=[atol], rtol=[rtol]))
