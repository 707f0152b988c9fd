"""Timestep respacing: a diffusion that keeps a subset of a base diffusion's steps (Nichol & Dhariwal 2021).

Keeping steps S = {s_0 < s_1 < ...} of a base process with cumulative alphas abar gives the process with betas
``1 - abar[s_k] / abar[s_{k-1}]`` (``abar[s_{-1}] = 1``), whose marginals q(x_k | x_0) equal the base ones at
s_k; so a model trained on the base process serves it unchanged, called with the original indices s_k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .gaussian_diffusion import GaussianDiffusion


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"timestep respacing: {what} must be an integer, got {text!r}") from None


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Steps of a ``num_timesteps``-step process to keep.

    ``section_counts`` is a list of counts or a comma-separated string such as ``"10,15,20"``: the steps are split
    into that many equal sections (the first ``num_timesteps % len`` one step longer) and each section keeps its
    count of steps, evenly strided (rounded) from its first step to its last. ``"ddimN"`` instead keeps
    ``range(0, num_timesteps, stride)`` for the integer stride that gives exactly N steps (the DDIM paper's
    spacing). Raises ValueError when a count does not fit its section or no stride gives N steps.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = _parse_int(spec[len("ddim"):], "the step count of 'ddimN'")
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"timestep respacing {spec!r}: no integer stride gives exactly {desired} of "
                             f"{num_timesteps} steps")
        counts = [_parse_int(part.strip(), "each comma-separated section count") for part in spec.split(",")]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("timestep respacing: no section counts given")

    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    steps: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 <= count <= size:
            raise ValueError(f"timestep respacing {section_counts!r}: cannot take {count} steps from section {i} "
                             f"of {size} steps ({num_timesteps} steps in {len(counts)} sections)")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated (not k * stride) so that rounding matches the official code exactly
        for _ in range(count):
            steps.add(start + round(position))
            position += stride
        start += size
    return steps


class SpacedDiffusion(GaussianDiffusion):
    """A ``GaussianDiffusion`` over the steps ``use_timesteps`` of the base process with ``betas``.

    Step k of this diffusion is step ``timestep_map[k]`` of the base; the model is called with the latter (the
    official DiT's ``rescale_timesteps=False``: indices, not rescaled floats).

    Args:
        use_timesteps: base steps to keep (any iterable of ints; see ``space_timesteps``).
        betas, model_mean_type, model_var_type, loss_type: those of the base process (``GaussianDiffusion``).
    """

    def __init__(self, use_timesteps: Iterable[int], *, betas: Sequence[float] | np.ndarray, **kwargs: Any) -> None:
        base_betas = np.array(betas, dtype=np.float64)
        self.use_timesteps = {int(s) for s in use_timesteps}
        self.original_num_steps = len(base_betas)
        if not self.use_timesteps:
            raise ValueError("use_timesteps is empty: keep at least one step")
        kept = sorted(self.use_timesteps)
        if kept[0] < 0 or kept[-1] >= self.original_num_steps:
            raise ValueError(f"use_timesteps must lie in [0, {self.original_num_steps - 1}], "
                             f"got {kept[0]}..{kept[-1]}")
        alphas_cumprod = np.cumprod(1.0 - base_betas)[kept]
        new_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        super().__init__(betas=new_betas, timestep_map=kept, **kwargs)
