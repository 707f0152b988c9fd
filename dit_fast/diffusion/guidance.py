"""Classifier-free guidance (Ho & Salimans 2022): one implementation, used by every model and sampler.

``guided_forward(forward, x, t, y, cfg_scale, ...)`` (defined with the model, ``dit_fast.reference``, re-exported
here) is the official DiT ``forward_with_cfg`` for any network
``forward(x, t, y)``: the batch is ``[cond; uncond]`` (labels ``[y; null]``), both halves read the first half of x,
and the result is, for both halves,

    guided eps = uncond + cfg_scale * (cond - uncond)     on the guided channels,
    the conditional output                                on every other channel,

so the learned-variance channels always come from the conditional pass, never guided. ``guide_channels=3``
reproduces the official DiT exactly (it guides output channels 0..2 only: three of the four latent eps channels,
kept by the authors for bit-exact FID 2.27; for models with fewer than 3 input channels only their eps channels
are guided), ``"all"`` is the standard guidance of all eps channels. An optional ``interval=(lo, hi)`` applies
guidance only at original timesteps lo <= t <= hi (Kynkaanniemi et al. 2024) and returns the conditional output
elsewhere. ``DiT.forward_with_cfg`` and ``DiTFast.forward_with_cfg`` are this function (DiTFast embeds the shared
half once).

``CFGModel(model, cfg_scale, null_class)`` is the sampler-side view: a model ``(x, t, y) -> output`` on the N
un-doubled inputs, so every sampler accepts it. It builds ``[x; x]``, ``[t; t]``, ``[y; null]``, runs the wrapped
model's own ``forward_with_cfg`` when it has one (a DiT: the fast shared-embedding path) or ``guided_forward`` over
the plain callable, and returns the first half. With ``cfg_scale == 1`` or with an interval that excludes every
element of the batch it runs one un-doubled conditional pass instead (deciding that reads one bool from the device
per call).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dit_fast.reference import GuideChannels, check_interval, guided_forward, num_guided_channels

__all__ = ["CFGModel", "GuideChannels", "check_interval", "guided_forward", "num_guided_channels"]

class CFGModel(nn.Module):
    """Classifier-free guided view of a class-conditional model, on un-doubled inputs.

    Args:
        model: a network ``model(x (2N, C, ...), t (2N,), y (2N,)) -> (2N, C_out, ...)`` with C_out = 2C (learned
            sigma: eps, then variance values) or C; a DiT (whose ``forward_with_cfg`` is then used) or any callable.
        cfg_scale: guidance scale; 1.0 is the conditional model (then a single, un-doubled pass runs).
        null_class: the label of the unconditional ("dropped") class, e.g. ``num_classes`` (1000 for ImageNet).
        guide_channels: 3 (official DiT: channels ``0..min(3, C)-1``), ``"all"`` (all C eps channels) or any
            positive int k (channels ``0..min(k, C)-1``).
        interval: optional inclusive range (lo, hi) of original timesteps where guidance applies.
    """

    def __init__(self, model: Callable[..., torch.Tensor], cfg_scale: float, null_class: int,
                 guide_channels: GuideChannels = 3, interval: tuple[int, int] | None = None) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
        if not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
        num_guided_channels(guide_channels, 1)  # validates
        self.model = model  # an nn.Module registers as a submodule, so .parameters() / .to() reach it
        self.cfg_scale = float(cfg_scale)
        self.null_class = int(null_class)
        self.guide_channels = guide_channels
        self.interval = check_interval(interval)

    def num_guided_channels(self, in_channels: int) -> int:
        """How many leading output channels are guided for inputs with ``in_channels`` (eps) channels."""
        return num_guided_channels(self.guide_channels, in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, ...), t: (N,) original timesteps, y: (N,) class labels -> guided output (N, C_out, ...)."""
        n = x.shape[0]
        if t.shape != (n,) or y.shape != (n,):
            raise ValueError(f"CFGModel: t and y must have shape ({n},) for x {tuple(x.shape)}, "
                             f"got t {tuple(t.shape)} and y {tuple(y.shape)}")
        if self.cfg_scale == 1.0:
            return self.model(x, t, y)
        if self.interval is not None and not bool(((t >= self.interval[0]) & (t <= self.interval[1])).any()):
            return self.model(x, t, y)
        x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)])
        options = {} if self.interval is None else {"interval": self.interval}
        forward_with_cfg = getattr(self.model, "forward_with_cfg", None)
        if callable(forward_with_cfg):
            out = forward_with_cfg(x2, t2, y2, self.cfg_scale, guide_channels=self.guide_channels, **options)
        else:
            out = guided_forward(self.model, x2, t2, y2, self.cfg_scale, self.guide_channels, **options)
        return out[:n]
