"""Training-free step caching for DiT sampling: skip most of the network on steps whose features barely change.

Neighbouring sampling steps call the network on nearly the same input, so each block's attention and MLP branch
outputs change slowly from step to step. A cache policy decides, per network call ("step"), whether to compute
every branch ("full step") or to reuse / forecast them from earlier full steps ("cached step"); on a cached step a
block does only its cheap parts (adaLN modulation from the current timestep, norms, gated residuals), so the
attention and MLP GEMMs, the bulk of the work, are skipped. Policies (``parse_cache`` spells them):

- ``FixedInterval(n)``, ``"fora:N"`` (FORA, Selvaraju et al. 2024): a full step every N steps, the branch outputs
  reused unchanged in between.
- ``TaylorForecast(n, order)``, ``"taylor:N:O"`` (TaylorSeer, Liu et al. 2025): a full step every N steps; in
  between each branch output is forecast by a Taylor expansion of order O (1 or 2) in the step count whose
  derivatives are finite differences of the last O + 1 full steps (in Newton's backward-difference form, so the
  forecast is exact for features that are polynomials of order O in the step; lower orders until enough full
  steps exist).
- ``Adaptive(threshold, max_reuse)``, ``"adaptive:T[:M]"`` (TeaCache / first-block cache, Liu et al. 2024): the
  probe is the first block's attention input (the timestep-modulated normalised tokens, computed on every step
  anyway); a full step runs when its mean absolute relative change since the last full step reaches T, or after
  M cached steps in a row; otherwise branch outputs are reused. Reading the change costs one device sync a step.
- ``"auto"``: the setting measured best on the built-in digits model (``benchmarks/results/cache_frontier.md``),
  the largest saving with no visible quality loss: ``AUTO_SPEC`` ("taylor:4:2") for samplers of at least
  ``AUTO_MIN_STEPS`` network calls (DDPM-250, DDIM-50), ``AUTO_SPEC_FEW_STEPS`` ("adaptive:0.15:4") for fewer
  (DPM-Solver++-20), where every step moves further and fixed reuse costs quality.

Use ``step_cache(model, policy)`` around one sampling run of a ``DiT`` or ``DiTFast``; it works with every sampler
(DDPM, DDIM, DPM-Solver++), any batch size, and classifier-free guidance through ``forward_with_cfg``: the cached
features are kept per batch row, so the conditional and unconditional halves each reuse their own. When the batch
layout changes (a guidance interval switching the unconditional half on or off) the cache starts over with a full
step. Without a policy (``None`` / ``"none"``) nothing is installed and results are bit-identical to no cache::

    with step_cache(model, "fora:3") as cache:
        z = diffusion.p_sample_loop(CFGModel(model, 2.0, null_class), shape, ...)
    print(cache.full_steps, cache.cached_steps)

The adaptive policy decides for the whole batch (the mean change over all rows), so with it a sample can depend on
the other samples of its batch; the fixed-schedule policies keep samples independent of each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUTO_MIN_STEPS",
    "AUTO_SPEC",
    "AUTO_SPEC_FEW_STEPS",
    "Adaptive",
    "CachePolicy",
    "FixedInterval",
    "StepCache",
    "TaylorForecast",
    "parse_cache",
    "step_cache",
]

AUTO_SPEC = "taylor:4:2"
"""The policy ``--cache auto`` selects for samplers of ``AUTO_MIN_STEPS`` steps or more (see the module docstring)."""
AUTO_SPEC_FEW_STEPS = "adaptive:0.15:4"
"""The policy ``--cache auto`` selects for samplers of fewer steps."""
AUTO_MIN_STEPS = 50


class CachePolicy:
    """When to run a full step. Subclasses set ``order`` (Taylor order of the prediction on cached steps; 0 reuses
    the last full step's outputs) and ``needs_probe`` (``should_compute`` gets the probe's relative change)."""

    order: int = 0
    needs_probe: bool = False

    def should_compute(self, since_full: int, change: float | None) -> bool:
        """Whether the step ``since_full`` steps after the last full step (>= 1) is a full step; ``change`` is the
        probe's relative change since that full step (None unless ``needs_probe``)."""
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """The policy's string form, as ``parse_cache`` reads it."""
        raise NotImplementedError


def _check_interval(interval: int) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an integer >= 1 (steps from one full step to the next), "
                         f"got {interval!r}")


@dataclass(frozen=True)
class FixedInterval(CachePolicy):
    """FORA: a full step every ``interval`` steps, branch outputs reused in between (``interval=1``: no caching)."""

    interval: int

    def __post_init__(self) -> None:
        _check_interval(self.interval)

    def should_compute(self, since_full: int, change: float | None) -> bool:
        return since_full >= self.interval

    @property
    def spec(self) -> str:
        return f"fora:{self.interval}"


@dataclass(frozen=True)
class TaylorForecast(FixedInterval):
    """TaylorSeer: ``FixedInterval``'s full steps; in between, each branch output is forecast by a Taylor expansion of
    ``order`` (1 or 2) in the step count, from finite differences of the last full steps."""

    order: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in (1, 2):
            raise ValueError(f"Taylor forecast order must be 1 or 2, got {self.order!r}")

    @property
    def spec(self) -> str:
        return f"taylor:{self.interval}:{self.order}"


@dataclass(frozen=True)
class Adaptive(CachePolicy):
    """TeaCache-style: a full step when the probe (the first block's attention input) has changed by ``threshold``
    (mean |new - old| / mean |old|) since the last full step, or after ``max_reuse`` cached steps in a row."""

    threshold: float
    max_reuse: int = 4
    needs_probe = True

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):
            raise ValueError(f"adaptive cache threshold must be a number >= 0, got {self.threshold!r}")
        if isinstance(self.max_reuse, bool) or not isinstance(self.max_reuse, int) or self.max_reuse < 0:
            raise ValueError(f"adaptive cache max_reuse must be an integer >= 0, got {self.max_reuse!r}")

    def should_compute(self, since_full: int, change: float | None) -> bool:
        return since_full > self.max_reuse or change is None or change >= self.threshold

    @property
    def spec(self) -> str:
        return f"adaptive:{self.threshold:g}:{self.max_reuse}"


CACHE_SPEC_HELP = ("none (default), auto (the measured recommended policy: " + AUTO_SPEC + " for samplers of >= "
                   + str(AUTO_MIN_STEPS) + " steps, else " + AUTO_SPEC_FEW_STEPS + "), fora:N (reuse every "
                   "block's attention/MLP outputs for N-1 of every N steps), taylor:N:O (forecast them with an "
                   "order-O Taylor series, O = 1 or 2), adaptive:T[:M] (recompute when the first block's input "
                   "changed by T since the last full step, or after M cached steps; default M 4)")


def parse_cache(spec: str | CachePolicy | None, num_steps: int | None = None) -> CachePolicy | None:
    """A policy from its string form (see ``CACHE_SPEC_HELP``); None for "none". Policies pass through.

    ``num_steps`` (the sampler's network calls per sample) selects what "auto" means; None counts as many.
    Raises ValueError naming the problem for a malformed spec.
    """
    if spec is None or isinstance(spec, CachePolicy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"cache spec must be a string or a CachePolicy, got {type(spec).__name__}")
    text = spec.strip().lower()
    if text in ("", "none", "off"):
        return None
    if text == "auto":
        text = AUTO_SPEC if num_steps is None or num_steps >= AUTO_MIN_STEPS else AUTO_SPEC_FEW_STEPS
    name, *args = text.split(":")

    def number(value: str, kind: type, what: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"cache spec {spec!r}: {what} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}") from None

    shapes = {"fora": (1, 1), "taylor": (1, 2), "adaptive": (1, 2)}
    if name not in shapes:
        raise ValueError(f"unknown cache policy {name!r} in {spec!r}; choose none, auto, fora:N, taylor:N:O or "
                         f"adaptive:T[:M]")
    lo, hi = shapes[name]
    if not lo <= len(args) <= hi:
        raise ValueError(f"cache spec {spec!r}: {name} takes {lo if lo == hi else f'{lo} or {hi}'} "
                         f"colon-separated values")
    if name == "fora":
        return FixedInterval(number(args[0], int, "the interval N"))
    if name == "taylor":
        order = number(args[1], int, "the order O") if len(args) > 1 else 1
        return TaylorForecast(number(args[0], int, "the interval N"), order)
    max_reuse = number(args[1], int, "max cached steps M") if len(args) > 1 else Adaptive.max_reuse
    return Adaptive(number(args[0], float, "the threshold T"), max_reuse)


class StepCache:
    """One sampling run's cache on a DiT's blocks (use ``step_cache``).

    While installed, every block and its ``attn`` and ``mlp`` modules answer through the cache: the first block's
    call (or, for a policy with a probe, its attention call) starts a step and asks the policy whether it is a
    full step. Full steps compute and record every branch output; on cached steps each block runs its
    ``forward_from_branches`` on the recorded (order 0) or forecast outputs (a block without that method runs
    its own forward, whose ``attn`` and ``mlp`` then return them).

    Attributes: ``full_steps`` and ``cached_steps`` (counts so far), ``decisions`` (one bool per step, True for
    full), ``policy``.
    """

    def __init__(self, model: nn.Module, policy: CachePolicy) -> None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or not all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks):
            raise TypeError(f"step caching needs a DiT (a module with .blocks, each with .attn and .mlp), got "
                            f"{type(model).__name__}")
        if len(blocks) == 0:
            raise ValueError("step caching needs a model with at least one block")
        compiled = [name for name, m in (("the model", model), *((f"block {i}", b) for i, b in enumerate(blocks)))
                    if getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod")]
        if compiled:
            raise ValueError(f"step caching decides per step in Python, so it cannot run inside a compiled graph, and "
                             f"{compiled[0]} is compiled: sample the eager model with a cache, or compile without one")
        self.model = model
        self.policy = policy
        self.branches: list[nn.Module] = [m for b in blocks for m in (b.attn, b.mlp)]
        self.full_steps = 0
        self.cached_steps = 0
        self.decisions: list[bool] = []
        self._saved: list[tuple[nn.Module, Any]] = []  # (module, its instance forward before install or None)
        self.reset()

    def reset(self) -> None:
        """Forget every recorded feature: the next step is a full step."""
        self._layout: tuple[Any, ...] | None = None
        self._features: list[list[torch.Tensor]] = [[] for _ in self.branches]  # per branch: [F, F', F'']
        self._dtypes: list[torch.dtype | None] = [None for _ in self.branches]  # per branch: its output dtype
        self._probe: torch.Tensor | None = None
        self._since_full = 0  # steps since the last full step, this one included
        self._gap = 0  # steps between the last two full steps (0: only one so far)
        self._full = True

    # ------------------------------------------------------------------ installation

    def install(self) -> None:
        """Route every block, its ``attn`` and its ``mlp`` through the cache (instance ``forward`` overrides: the
        module tree, parameters and state dict stay as they are)."""
        if self._saved:
            raise RuntimeError("this StepCache is already installed")
        blocks = self.model.blocks
        for index, module in enumerate(self.branches):
            self._saved.append((module, module.__dict__.get("forward")))
            module.forward = self._branch_forward(index, module.forward)
        for index, block in enumerate(blocks):
            self._saved.append((block, block.__dict__.get("forward")))
            block.forward = self._block_forward(index, block.forward, getattr(block, "forward_from_branches", None))

    def remove(self) -> None:
        """Restore the modules' own ``forward``."""
        for module, saved in self._saved:
            del module.forward
            if saved is not None:
                module.forward = saved
        self._saved = []

    def _block_forward(self, index: int, compute: Callable[..., Any], from_branches: Callable[..., Any] | None
                       ) -> Callable[..., Any]:
        """Block ``index``'s forward: on cached steps its ``forward_from_branches`` (no norms, attention or MLP),
        when it has one; the block's own forward otherwise (whose branches then answer from the cache)."""
        decides = index == 0 and not self.policy.needs_probe  # else the first attention call decides

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if decides:
                self._begin_step(x)
            if self._full or from_branches is None or (index == 0 and self.policy.needs_probe):
                return compute(x, *args, **kwargs)
            return from_branches(x, *args, attn_out=self._predict(2 * index), mlp_out=self._predict(2 * index + 1),
                                 **kwargs)

        return forward

    def _branch_forward(self, index: int, compute: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        probes = index == 0 and self.policy.needs_probe

        def forward(h: torch.Tensor, *args: Any) -> torch.Tensor:  # h: (N, T, D) -> (N, T, D); args: e.g. the ops
            if probes:
                self._begin_step(h)
            if self._full:
                out = compute(h, *args)
                self._record(index, out)
                return out
            return self._predict(index)

        return forward

    # ------------------------------------------------------------------ per step

    def _begin_step(self, probe: torch.Tensor) -> None:
        """Start a step: decide full or cached from the policy and, for a policy that needs one, the probe (the
        first attention input; else the first block's input, which only sets the batch layout)."""
        layout = (tuple(probe.shape), probe.dtype, probe.device)
        if layout != self._layout:
            self.reset()
            self._layout = layout
        if not self._features[0]:
            full, since = True, 0
        else:
            since = self._since_full + 1
            change = None
            if self.policy.needs_probe and self._probe is not None:
                ref = self._probe
                change = float((probe - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))
            full = self.policy.should_compute(since, change)
        if full:
            self._gap, self._since_full = since, 0
            self._probe = probe if self.policy.needs_probe else None
            self.full_steps += 1
        else:
            self._since_full = since
            self.cached_steps += 1
        self._full = full
        self.decisions.append(full)

    def _record(self, index: int, out: torch.Tensor) -> None:
        """Record a full step's output of branch ``index``: the value, and finite-difference derivatives per step
        up to the policy's order (in fp32 at least, so low-precision differences keep their bits)."""
        old = self._features[index]
        order = self.policy.order
        self._dtypes[index] = out.dtype
        if order == 0:
            self._features[index] = [out]
            return
        value = out.to(torch.promote_types(out.dtype, torch.float32))
        new = [value]
        gap = self._gap
        for k in range(order):
            if len(old) <= k or gap <= 0:
                break
            new.append((new[k] - old[k]) / gap)
        self._features[index] = new

    def _predict(self, index: int) -> torch.Tensor:
        """A cached step's output of branch ``index``: the last full value, plus the Taylor terms available."""
        terms = self._features[index]
        if not terms:
            raise RuntimeError("step cache: a cached step before any full step (the model's blocks were called out "
                               "of order)")
        if len(terms) == 1:
            return terms[0].to(self._dtypes[index])  # a Taylor policy keeps its first term in fp32
        k = float(self._since_full)
        out = terms[0].add(terms[1], alpha=k)
        if len(terms) > 2:  # Newton's backward-difference form: exact for quadratics at a steady full-step gap
            out.add_(terms[2], alpha=k * (k + self._gap) / 2)
        return out.to(self._dtypes[index])

    def summary(self) -> str:
        """One line: the policy, full and cached steps."""
        steps = self.full_steps + self.cached_steps
        return (f"cache {self.policy.spec}: {self.full_steps} full of {steps} steps "
                f"({self.cached_steps} cached)")


@contextlib.contextmanager
def step_cache(model: nn.Module, policy: str | CachePolicy | None, num_steps: int | None = None
               ) -> Iterator[StepCache | None]:
    """Cache the blocks of ``model`` (a DiT or DiTFast) for one sampling run under ``policy`` (a ``CachePolicy``,
    a spec string for ``parse_cache`` with the run's ``num_steps``, or None/"none": nothing is installed, yields
    None). The features live only inside the ``with`` block: open one per sampling run (each batch)."""
    policy = parse_cache(policy, num_steps)
    if policy is None:
        yield None
        return
    cache = StepCache(model, policy)
    cache.install()
    try:
        yield cache
    finally:
        cache.remove()
