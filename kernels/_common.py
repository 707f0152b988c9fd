"""Plumbing shared by the fused ops: optional Triton, the interpreter switch, dispatch, capture, checks.

The row kernels' launch heuristics live beside the row kernels, in ``_row.py``.

Triton is probed (``find_spec``) and imported under a guard: this module (and so ``dit_fast.kernels``) imports on
machines without Triton or without a GPU, where every op runs its plain-PyTorch ``<op>_ref``; kernels are built only
when first launched. Nothing here touches ``torch.cuda`` at import.

Kernels are declared with :func:`triton_kernel` instead of ``@triton.jit``. ``triton.jit`` decides between a compiled
``JITFunction`` and the interpreter's ``InterpretedFunction`` once, from ``TRITON_INTERPRET`` at decoration (import)
time; :class:`TritonKernel` builds both on demand and picks per launch, so setting ``TRITON_INTERPRET=1`` after import
(as tests do with ``monkeypatch.setenv``) takes effect, and CPU tensors always go to the interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

HAS_TRITON = importlib.util.find_spec("triton") is not None
tl: Any = None  # triton.language, the name the kernels' bodies use
if HAS_TRITON:
    try:
        import triton.language as tl
    except ImportError:  # a broken install: behave as if absent
        HAS_TRITON = False

_TRUE_VALUES = ("1", "true", "yes", "on")


def interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (read at call time, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_VALUES


_warned_no_triton = False


def use_triton(x: torch.Tensor) -> bool:
    """Dispatch rule of every public op: run the Triton op for ``x``'s device, or the plain-PyTorch reference.

    CUDA tensors run Triton (falling back to the reference, with one warning, where Triton is not installed); CPU
    tensors run the reference unless ``TRITON_INTERPRET=1``, which sends them through the Triton interpreter (then
    Triton must be installed). Other devices run the reference.
    """
    global _warned_no_triton
    if x.device.type == "cuda":
        if not HAS_TRITON and not _warned_no_triton:
            warnings.warn("triton is not installed: dit_fast.kernels runs the plain-PyTorch reference ops on CUDA "
                          "(install it with `pip install triton`)", stacklevel=3)
            _warned_no_triton = True
        return HAS_TRITON
    if x.device.type == "cpu" and interpret_enabled():
        require_triton()
        return True
    return False


def require_triton() -> None:
    """Raise a clear ImportError where Triton is missing."""
    if not HAS_TRITON:
        raise ImportError("dit_fast.kernels: this path needs triton, which is not installed (`pip install triton`)")


class TritonKernel:
    """A Triton kernel built lazily in both flavours: compiled (``JITFunction``) and interpreted.

    ``kernel[grid](*args, **meta)`` launches the interpreted flavour when ``TRITON_INTERPRET`` is set or the first
    tensor argument lives on the CPU, else the compiled one through ``wrap_triton``. Fake tensors (``torch.compile``
    tracing the ``triton_op``) always take ``wrap_triton``, which records the launch without running it.
    """

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jit: Any = None
        self._interpreted: Any = None

    @property
    def jit(self) -> Any:
        """The compiled flavour, a ``triton.runtime.jit.JITFunction`` (also what ``triton.compile`` takes)."""
        if self._jit is None:
            require_triton()
            from triton.runtime.jit import JITFunction

            self._jit = JITFunction(self.fn)
        return self._jit

    @property
    def interpreted(self) -> Any:
        """The interpreter flavour, a ``triton.runtime.interpreter.InterpretedFunction``."""
        if self._interpreted is None:
            require_triton()
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        def launch(*args: Any, **meta: Any) -> Any:
            if _captured is not None:
                _captured.append(Launch(self, tuple(grid), args, meta))
                return None
            first = next(a for a in args if isinstance(a, torch.Tensor))
            if (interpret_enabled() or first.device.type == "cpu") and not is_fake(first):
                with language_flavour(interpreted=True):
                    return self.interpreted[grid](*args, **meta)
            with language_flavour(interpreted=False):
                return wrap_triton(self.jit)[grid](*args, **meta)

        return launch


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher issued it: the kernel, its grid, positional arguments and keyword meta
    (constexprs, ``num_warps``). Recorded by :func:`capture_launches`."""

    kernel: TritonKernel
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]


_captured: list[Launch] | None = None


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Record the launches the launchers issue instead of running them (``compile_check`` builds exactly these).

    The launchers still allocate their outputs (use CPU tensors: ``torch.empty`` does not touch the memory); what the
    kernels would write stays uninitialised.
    """
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


@functools.cache
def _flavoured(fn: Any, interpreted: bool) -> Any:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return InterpretedFunction(fn.fn) if interpreted else JITFunction(fn.fn)


@contextlib.contextmanager
def language_flavour(interpreted: bool) -> Iterator[None]:
    """Make ``triton.language``'s own ``@jit`` helpers (``tl.sum``, ``tl.zeros``, ...) the flavour a launch needs.

    ``triton.jit`` fixes each helper's flavour when triton is imported, from ``TRITON_INTERPRET`` at that moment; an
    interpreted kernel calling a compiled helper fails ("Cannot call @triton.jit'd outside of the scope of a kernel"),
    and the compiler cannot call interpreted ones. When the imported flavour differs from the one wanted, the helpers
    are swapped for the other flavour for the duration of the launch (what importing triton with the other
    ``TRITON_INTERPRET`` would have produced) and restored afterwards.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    have = JITFunction if interpreted else InterpretedFunction
    if not isinstance(tl.standard.sum, have):  # already the wanted flavour
        yield
        return
    swapped = []
    for module in (tl, tl.core, tl.standard, tl.math, tl.random):
        for name, obj in list(vars(module).items()):
            if isinstance(obj, have):
                swapped.append((module, name, obj))
                setattr(module, name, _flavoured(obj, interpreted))
    try:
        yield
    finally:
        for module, name, obj in swapped:
            setattr(module, name, obj)


def triton_kernel(fn: Callable[..., None]) -> TritonKernel:
    """Decorator declaring a Triton kernel (see :class:`TritonKernel`); use instead of ``@triton.jit``."""
    return TritonKernel(fn)


def register_op(name: str, fn: Callable[..., Any]) -> Any:
    """Register launcher ``fn`` as the functional custom op ``name`` ("dit_fast::<op>"); returns the op.

    With Triton installed this is ``torch.library.triton_op``, whose kernels ``torch.compile`` sees through
    ``wrap_triton``; without it, a plain ``custom_op`` (never called: dispatch sends every tensor to the reference).
    """
    if HAS_TRITON:
        return triton_op(name, fn, mutates_args=())
    return torch.library.custom_op(name, fn, mutates_args=())


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (>= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def prev_power_of_2(n: int) -> int:
    """Largest power of two <= ``n`` (>= 1)."""
    return 1 << max(int(n).bit_length() - 1, 0)


def check_tensor(name: str, t: Any, ndim: int) -> None:
    """TypeError unless ``t`` is a floating tensor of fp32/fp16/bf16; ValueError unless it has ``ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_device(ref_name: str, ref: torch.Tensor, others: Sequence[tuple[str, torch.Tensor]]) -> None:
    """ValueError unless every tensor in ``others`` is on ``ref``'s device."""
    for name, t in others:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def check_same_dtype(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor, why: str) -> None:
    """TypeError unless ``a`` and ``b`` share a dtype (``why`` says what depends on it)."""
    if a.dtype != b.dtype:
        raise TypeError(f"{names[0]} has dtype {a.dtype} but {names[1]} has {b.dtype}; they must match ({why})")


def check_modulation(name: str, t: Any, x: torch.Tensor) -> None:
    """Checks for a per-(batch, channel) modulation tensor (shift/scale/gate) against ``x`` of shape (B, T, D).

    Any float dtype (fp32/fp16/bf16), independent of x's: the residual stream may be fp32 while the modulation is in
    autocast's bf16/fp16.
    """
    check_tensor(name, t, 2)
    if t.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"{name} must have shape (B, D) = {(x.shape[0], x.shape[2])} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(t.shape)}")
    check_device("x", x, [(name, t)])


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride, else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
