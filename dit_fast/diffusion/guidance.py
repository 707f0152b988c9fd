"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper that every sampler accepts.

``CFGModel(model, cfg_scale, null_class)`` is itself a model ``(x, t, y) -> output``: it runs the wrapped
class-conditional model once on the doubled batch ``[x; x]`` with labels ``[y; null]`` (as the official DiT
``sample.py`` + ``forward_with_cfg`` do) and returns, for the N inputs,

    guided eps = uncond + cfg_scale * (cond - uncond)     on the guided channels,
    the conditional output                                on every other channel,

so the learned-variance channels always come from the conditional pass, never guided. ``guide_channels=3``
reproduces the official DiT exactly (it guides output channels 0..2 only: three of the four latent eps channels,
kept by the authors for bit-exact FID 2.27; for models with fewer than 3 input channels only their eps channels
are guided), ``"all"`` is the standard guidance of all eps channels. An optional ``interval=(lo, hi)`` applies
guidance only at original timesteps lo <= t <= hi (Kynkaanniemi et al. 2024) and returns the conditional output
elsewhere, skipping the unconditional pass when no element of the batch is inside the interval (deciding that
reads one bool from the device per call).

Official-style usage, for comparison: the sampler carries a doubled batch and ``model.forward_with_cfg`` guides
the first half; the output of ``CFGModel`` on x equals the first half of ``forward_with_cfg([x; x], [t; t],
[y; null], cfg_scale)`` for ``guide_channels=3``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn


class CFGModel(nn.Module):
    """Classifier-free guided view of a class-conditional model.

    Args:
        model: ``model(x (2N, C, ...), t (2N,), y (2N,)) -> (2N, C_out, ...)`` with C_out = 2C (learned sigma:
            eps, then variance values) or C. Usually a DiT (``nn.Module``) or its ``forward``.
        cfg_scale: guidance scale; 1.0 is the conditional model (then a single, un-doubled pass runs).
        null_class: the label of the unconditional ("dropped") class, e.g. ``num_classes`` (1000 for ImageNet).
        guide_channels: 3 (official DiT: channels ``0..min(3, C)-1``), ``"all"`` (all C eps channels) or any
            positive int k (channels ``0..min(k, C)-1``).
        interval: optional inclusive range (lo, hi) of original timesteps where guidance applies.
    """

    def __init__(self, model: Callable[..., torch.Tensor], cfg_scale: float, null_class: int,
                 guide_channels: int | Literal["all"] = 3, interval: tuple[int, int] | None = None) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
        if not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
        if guide_channels != "all" and not (isinstance(guide_channels, int) and guide_channels >= 1):
            raise ValueError(f"guide_channels must be a positive int or 'all', got {guide_channels!r}")
        if interval is not None:
            lo, hi = interval
            if not 0 <= lo <= hi:
                raise ValueError(f"interval must be (lo, hi) with 0 <= lo <= hi, got {interval!r}")
        self.model = model  # an nn.Module registers as a submodule, so .parameters() / .to() reach it
        self.cfg_scale = float(cfg_scale)
        self.null_class = int(null_class)
        self.guide_channels = guide_channels
        self.interval = None if interval is None else (int(interval[0]), int(interval[1]))

    def num_guided_channels(self, in_channels: int) -> int:
        """How many leading output channels are guided for inputs with ``in_channels`` (eps) channels."""
        return in_channels if self.guide_channels == "all" else min(self.guide_channels, in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, ...), t: (N,) original timesteps, y: (N,) class labels -> guided output (N, C_out, ...)."""
        n, c = x.shape[:2]
        if t.shape != (n,) or y.shape != (n,):
            raise ValueError(f"CFGModel: t and y must have shape ({n},) for x {tuple(x.shape)}, "
                             f"got t {tuple(t.shape)} and y {tuple(y.shape)}")
        if self.cfg_scale == 1.0:
            return self.model(x, t, y)
        active = None
        if self.interval is not None:
            active = (t >= self.interval[0]) & (t <= self.interval[1])  # (N,)
            if not bool(active.any()):
                return self.model(x, t, y)

        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        k = self.num_guided_channels(c)
        if out.shape[0] != 2 * n or out.shape[1] < k:
            raise ValueError(f"CFGModel: the model returned {tuple(out.shape)} for a batch of {2 * n}; expected "
                             f"(2N, >= {k}, ...)")
        cond, uncond = out[:n], out[n:]  # (N, C_out, ...) each
        guided = uncond[:, :k] + self.cfg_scale * (cond[:, :k] - uncond[:, :k])  # (N, k, ...)
        if active is not None:
            guided = torch.where(active.view(n, *([1] * (x.ndim - 1))), guided, cond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)
