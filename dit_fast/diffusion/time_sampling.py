"""How training draws its times: ``uniform`` or ``lognormal:M:S`` (logit-normal, Esser et al. 2024 "SD3" and
LightningDiT), for either objective.

Both are stated on the noise level s in [0, 1] (s = 0: data, s = 1: pure noise). ``uniform``: s ~ U[0, 1).
``lognormal:M:S``: s = sigmoid(M + S * n), n ~ N(0, 1): M = 0, S = 1 (``lognormal``) is SD3's default and, being
symmetric, LightningDiT's; M > 0 puts more weight on noisier times, as in SD3.

- Flow objective (``flow``): SiT's time runs the other way (t = 0 noise, t = 1 data), so t = 1 - s, then mapped
  into the training interval [t0, t1]: ``t = (1 - s) (t1 - t0) + t0`` (with ``uniform`` this is SiT's draw,
  ``t = u (t1 - t0) + t0``; u and 1 - u have the same law).
- DDPM objective: discrete timesteps. ``uniform`` is the official ``randint(0, T)`` (the trainer draws it itself,
  unchanged); ``lognormal`` maps s to the index ``floor(s * T)`` (clamped to T - 1), so the indices follow the
  logit-normal density over [0, T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["TimeSampling"]


@dataclass(frozen=True)
class TimeSampling:
    """A training-time distribution: ``kind`` "uniform" or "lognormal" with location ``m`` and scale ``s``."""

    kind: str = "uniform"
    m: float = 0.0
    s: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "lognormal"):
            raise ValueError(f"unknown time sampling {self.kind!r}; choose 'uniform' or 'lognormal:M:S'")
        if not (math.isfinite(self.m) and math.isfinite(self.s) and self.s > 0):
            raise ValueError(f"lognormal time sampling needs a finite M and S > 0, got M={self.m}, S={self.s}")

    @classmethod
    def parse(cls, spec: str) -> TimeSampling:
        """``"uniform"``, ``"lognormal"`` or ``"lognormal:M:S"`` -> TimeSampling; ValueError naming the problem."""
        parts = spec.strip().split(":")
        if parts[0] == "uniform" and len(parts) == 1:
            return cls()
        if parts[0] == "lognormal" and len(parts) in (1, 3):
            try:
                m, s = (float(v) for v in parts[1:]) if len(parts) == 3 else (0.0, 1.0)
            except ValueError:
                raise ValueError(f"time sampling {spec!r}: M and S must be numbers (e.g. lognormal:0:1)") from None
            return cls("lognormal", m, s)
        raise ValueError(f"time sampling {spec!r}: expected 'uniform', 'lognormal' or 'lognormal:M:S'")

    @property
    def spec(self) -> str:
        """The string ``parse`` reads back."""
        return "uniform" if self.kind == "uniform" else f"lognormal:{self.m:g}:{self.s:g}"

    def noise_levels(self, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """n noise levels s in [0, 1) (float32), s = 0 data, s = 1 noise, drawn on the generator's device."""
        where = generator.device if generator is not None else torch.device(device)
        if self.kind == "uniform":
            return torch.rand((n,), generator=generator, device=where).to(device)
        return torch.sigmoid(self.m + self.s * torch.randn((n,), generator=generator, device=where)).to(device)

    def flow_times(self, n: int, t0: float, t1: float, *, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """n flow times (float32) in [t0, t1], t = 0 noise (SiT's convention)."""
        u = self.noise_levels(n, generator, device)
        if self.kind != "uniform":  # uniform: SiT's draw u ~ U[0, 1) itself
            u = 1 - u
        return u * (t1 - t0) + t0

    def ddpm_timesteps(self, n: int, num_timesteps: int, *, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
        """n DDPM timestep indices (int64) in [0, num_timesteps), index T - 1 the noisiest (``uniform``: the
        official ``randint``)."""
        if self.kind == "uniform":
            where = generator.device if generator is not None else torch.device(device)
            return torch.randint(0, num_timesteps, (n,), generator=generator, device=where).to(device)
        s = self.noise_levels(n, generator, device).double()
        return (s * num_timesteps).floor().long().clamp_(0, num_timesteps - 1)
