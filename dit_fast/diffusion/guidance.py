"""Classifier-free guidance (Ho & Salimans 2022): one implementation, used by every model and sampler.

``guided_forward(forward, x, t, y, cfg_scale, ...)`` is the official DiT ``forward_with_cfg`` for any network
``forward(x, t, y)``: the batch is ``[cond; uncond]`` (labels ``[y; null]``), both halves read the first half of x,
and the result is, for both halves,

    guided eps = uncond + cfg_scale * (cond - uncond)     on the guided channels,
    the conditional output                                on every other channel,

so the learned-variance channels always come from the conditional pass, never guided. ``guide_channels=3``
reproduces the official DiT exactly (it guides output channels 0..2 only: three of the four latent eps channels,
kept by the authors for bit-exact FID 2.27; for models with fewer than 3 input channels only their eps channels
are guided), ``"all"`` is the standard guidance of all eps channels. An optional ``interval=(lo, hi)`` applies
guidance only at times lo <= t <= hi (Kynkaanniemi et al. 2024; original DDPM timesteps, or flow times in [0, 1])
and returns the conditional output elsewhere. ``DiT.forward_with_cfg`` and ``DiTFast.forward_with_cfg`` are this
function (DiTFast embeds the shared half once).

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
from typing import Literal

import torch
from torch import nn

GuideChannels = int | Literal["all"]


def num_guided_channels(guide_channels: GuideChannels, in_channels: int) -> int:
    """How many leading output channels are guided for inputs with ``in_channels`` (eps) channels."""
    if guide_channels == "all":
        return in_channels
    if isinstance(guide_channels, int) and not isinstance(guide_channels, bool) and guide_channels >= 1:
        return min(guide_channels, in_channels)
    raise ValueError(f"guide_channels must be a positive int or 'all', got {guide_channels!r}")


def check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """``interval`` as a pair of numbers (or None), ints kept as ints; ValueError unless ``0 <= lo <= hi``. The
    unit is the sampler's time: DDPM timestep indices, or flow times in [0, 1]."""
    if interval is None:
        return None
    try:
        lo, hi = (v if isinstance(v, int) else float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"interval must be (lo, hi) with 0 <= lo <= hi, got {interval!r}") from None
    if not 0 <= lo <= hi or not math.isfinite(hi):
        raise ValueError(f"interval must be (lo, hi) with 0 <= lo <= hi, got {interval!r}")
    return lo, hi


def guided_forward(forward: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   cfg_scale: float, guide_channels: GuideChannels = 3, in_channels: int | None = None,
                   interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Classifier-free guidance in one batched forward (the official ``forward_with_cfg``, extended).

    Args:
        forward: the network, ``forward(x (2N, C, ...), t (2N,), y (2N,)) -> (2N, C_out, ...)``.
        x: (2N, C, ...); only the first half is read (it is fed to both halves).
        t: (2N,) original timesteps; y: (2N,) labels, the real ones then the null class.
        cfg_scale: guidance scale.
        guide_channels: 3 (official), "all" (every eps channel) or any positive int k.
        in_channels: the eps channels (default: x's channels); never more than these are guided.
        interval: optional inclusive range (lo, hi) of original timesteps where guidance applies; elsewhere the
            conditional output is returned.

    Returns:
        (2N, C_out, ...): the guided eps channels, then the conditional pass's other channels, for both halves.
        The guidance is computed in fp32 at least and returned in the network's output dtype.
    """
    if x.shape[0] % 2:
        raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]}")
    k = num_guided_channels(guide_channels, x.shape[1] if in_channels is None else in_channels)
    interval = check_interval(interval)
    n = x.shape[0] // 2
    half = x[:n]
    model_out = forward(torch.cat([half, half], dim=0), t, y)  # (2N, C_out, ...)
    if model_out.shape[0] != 2 * n or model_out.shape[1] < k:
        raise ValueError(f"guidance: the model returned {tuple(model_out.shape)} for a batch of {2 * n}; expected "
                         f"(2N, >= {k}, ...)")
    eps, rest = model_out[:, :k], model_out[:, k:]
    cond_eps, uncond_eps = torch.split(eps, n, dim=0)  # (N, k, ...) each
    compute = torch.promote_types(eps.dtype, torch.float32)
    half_eps = uncond_eps.to(compute) + cfg_scale * (cond_eps.to(compute) - uncond_eps.to(compute))
    half_eps = half_eps.to(eps.dtype)
    if interval is not None:
        active = (t[:n] >= interval[0]) & (t[:n] <= interval[1])  # (N,)
        half_eps = torch.where(active.view(n, *([1] * (eps.ndim - 1))), half_eps, cond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)



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
                 guide_channels: GuideChannels = 3, interval: tuple[float, float] | None = None) -> None:
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
