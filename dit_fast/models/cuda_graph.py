"""``CUDAGraphRunner``: a DiTFast served by CUDA graphs, one captured graph per input shape and guidance setting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dit_fast.models.dit import DiTFast


class CUDAGraphRunner:
    """A DiTFast served by CUDA graphs: ``runner(x, t, y)`` and ``runner.forward_with_cfg(...)`` with the model's
    signatures, each captured once per input shape and guidance setting (``DiTFast.cuda_graph``) and replayed.

    For sampling loops (``dit-fast sample --cuda-graph``): the first call of each shape captures (under the autocast
    context active then, which the replays keep), later calls replay. Outputs are cloned, so they stay valid.
    """

    def __init__(self, model: DiTFast) -> None:
        if not isinstance(model, DiTFast):
            raise TypeError(f"CUDA-graph sampling needs a DiTFast model, got {type(model).__name__}")
        self.model = model
        self.graphs: dict[tuple[Any, ...], Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}

    @property
    def config(self) -> Any:
        return self.model.config

    def _run(self, key: tuple[Any, ...], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
             capture: Callable[[], Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
             ) -> torch.Tensor:
        key = (*key, tuple(x.shape), x.dtype, t.dtype, y.dtype, x.device, torch.is_autocast_enabled(x.device.type),
               torch.get_autocast_dtype(x.device.type))
        run = self.graphs.get(key)
        if run is None:
            run = self.graphs[key] = capture()
        return run(x, t, y).clone()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """As ``DiTFast.forward``: x (N, C, H, W), t (N,), y (N,) -> (N, out_channels, H, W)."""
        return self._run(("forward",), x, t, y, lambda: self.model.cuda_graph(x, t, y))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int | str = 3, interval: tuple[float, float] | None = None) -> torch.Tensor:
        """As ``DiTFast.forward_with_cfg`` on the doubled batch (2N, ...)."""
        key = ("cfg", float(cfg_scale), guide_channels, None if interval is None else tuple(interval))
        return self._run(key, x, t, y, lambda: self.model.cuda_graph(x, t, y, cfg_scale, guide_channels=guide_channels,
                                                                     interval=interval))


