"""How dit-fast processes end: SIGTERM handled like Ctrl-C, and worker processes that end with their parent.

- ``terminate_as_interrupt()``: while active, SIGTERM (a scheduler's preemption, ``kill``) raises ``Terminated``,
  a ``BaseException`` like ``KeyboardInterrupt``: no ``except Exception`` swallows it, every ``finally`` and
  ``atomic_write`` removes its temporaries on the way out, and the command exits 143 with one line. The ``dit-fast``
  command wraps every command in it; training replaces it, inside its loop, by ``distributed.StopSignals`` (save a
  checkpoint first, then stop).
- ``init_worker``: the ``worker_init_fn`` of every ``DataLoader``. A worker ignores SIGINT (Ctrl-C reaches the whole
  process group; the main process decides what to do), ends quietly on SIGTERM (what the loader and Python's exit
  handler send when shutting workers down: a worker that ignored it made the main process wait forever after a
  worker error) and is killed by the kernel when its parent dies (``PR_SET_PDEATHSIG`` on Linux).
- ``worker_errors()``: an exception raised in a worker reaches the main process with the worker's whole traceback
  in its message; this turns it into one ``UserError`` line, the worker's own message.
- ``pause_point(name)``: for fault-injection tests, with ``DIT_FAST_PAUSE_AT=name`` the process says
  ``dit-fast: paused at NAME`` on stderr and waits for a line on stdin there (a signal can be sent meanwhile).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from dit_fast.utils.validation import UserError

PAUSE_ENV_VAR = "DIT_FAST_PAUSE_AT"
_PR_SET_PDEATHSIG = 1
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class Terminated(BaseException):
    """The process received ``signum`` (SIGTERM) and is unwinding; ``exit_code`` = 128 + signum."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread while the block runs (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_now(signum: int, frame: Any) -> None:
    os._exit(0)  # a clean exit status: the loader's SIGCHLD check reports signal deaths and non-zero exits only


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def init_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loading workers (see the module docstring)."""
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_now)
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(0)


def worker_message(error: BaseException) -> str | None:
    """The worker's own message of an exception re-raised from a DataLoader worker ("cannot read image ..."),
    or None for any other exception."""
    text = str(error)
    if _WORKER_TRACEBACK not in text:
        return None
    last = text.rstrip().splitlines()[-1]
    _, sep, message = last.partition(": ")
    return message if sep else last


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Turn an exception re-raised from a DataLoader worker into one ``UserError`` line (the worker's message)."""
    try:
        yield
    except Exception as e:
        message = worker_message(e)
        if message is None:
            raise
        raise UserError(f"{message} (in a data-loading worker)") from None


def pause_point(name: str) -> None:
    """Wait for a line on stdin when ``$DIT_FAST_PAUSE_AT`` is ``name`` (fault-injection tests); else nothing."""
    if os.environ.get(PAUSE_ENV_VAR) != name:
        return
    print(f"dit-fast: paused at {name}", file=sys.stderr, flush=True)
    sys.stdin.readline()
