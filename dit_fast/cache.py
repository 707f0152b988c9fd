"""Training-free step caching for DiT sampling: skip most of the network on steps whose features barely change.

A cache policy decides, per network call ("step"), whether to compute every block's attention and MLP branch
("full step") or to reuse / forecast their outputs from earlier full steps ("cached step", which runs only the adaLN
modulation, norms and gated residuals). Policies (``parse_cache`` spells them):

- ``FixedPeriod(n)``, ``"fora:N"`` (FORA): a full step every N steps, the branch outputs reused in between;
- ``TaylorForecast(n, order)``, ``"taylor:N:O"`` (TaylorSeer): a full step every N steps, the outputs forecast in
  between by an order-O Taylor expansion from finite differences of the last full steps;
- ``Adaptive(threshold, max_reuse)``, ``"adaptive:T[:M]"`` (TeaCache): a full step when the first block's
  modulated input moved by T since the last full step, or after M cached steps;
- ``"auto"``: the setting measured best (``AUTO_SPEC`` for samplers of at least ``AUTO_MIN_STEPS`` calls,
  ``AUTO_SPEC_FEW_STEPS`` for fewer).

``step_cache(model, policy)`` installs a ``StepCache`` on a ``DiT`` or ``DiTFast`` for one sampling run, with any
sampler, batch size and classifier-free guidance::

    with step_cache(model, "fora:3") as cache:
        z = diffusion.p_sample_loop(CFGModel(model, 2.0, null_class), shape, ...)
    print(cache.full_steps, cache.cached_steps)

docs/caching.md explains the policies, guidance and batch behaviour; the measurements are in
benchmarks/results/cache_frontier.md.
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
    "FixedPeriod",
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


def _check_period(period: int) -> None:
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"cache period must be an integer >= 1 (steps from one full step to the next), "
                         f"got {period!r}")


@dataclass(frozen=True)
class FixedPeriod(CachePolicy):
    """FORA: a full step every ``period`` steps, branch outputs reused in between (``period=1``: no caching)."""

    period: int

    def __post_init__(self) -> None:
        _check_period(self.period)

    def should_compute(self, since_full: int, change: float | None) -> bool:
        return since_full >= self.period

    @property
    def spec(self) -> str:
        return f"fora:{self.period}"


@dataclass(frozen=True)
class TaylorForecast(FixedPeriod):
    """TaylorSeer: ``FixedPeriod``'s full steps; in between, each branch output is forecast by a Taylor expansion of
    ``order`` (1 or 2) in the step count, from finite differences of the last full steps."""

    order: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in (1, 2):
            raise ValueError(f"Taylor forecast order must be 1 or 2, got {self.order!r}")

    @property
    def spec(self) -> str:
        return f"taylor:{self.period}:{self.order}"


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
        return FixedPeriod(number(args[0], int, "the period N"))
    if name == "taylor":
        order = number(args[1], int, "the order O") if len(args) > 1 else 1
        return TaylorForecast(number(args[0], int, "the period N"), order)
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
