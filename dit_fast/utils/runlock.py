"""A training run folder: its known layout and its one writer.

Layout: ``<results>/NNN-<model>/`` holds ``config.json`` (the run's: "model", "recipe", "args"), ``log.txt``,
``log.csv``, ``checkpoints/<step:07d>.pt`` and ``.lock``. ``run_folder_of(checkpoint)`` is the run folder a
checkpoint belongs to, or None when the file is not at ``<run>/checkpoints/<step>.pt`` of a folder whose
``config.json`` is a run's: a checkpoint from ``downloads/`` starts a new run folder, and its grandparent (which may
be anything of the user's) is never written.

One writer: ``RunLock(folder)`` takes an exclusive ``fcntl.flock`` on ``<run>/.lock`` and holds it for the life
of the process (the kernel releases it when the process ends, however it ends, so a killed run never leaves a
stale lock). A second writer (another ``--resume`` of the same run while it is live) fails at once with one line
naming the live process's PID, before it sweeps any temporary file or writes anything. The PID written in the file
is informational only; the lock is the ``flock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from dit_fast.utils.validation import UserError

LOCK_FILE = ".lock"
RUN_CONFIG_KEYS = {"model", "recipe", "args"}
CHECKPOINT_FILE = re.compile(r"^\d{7,}\.pt$")


def is_run_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a training run's ``config.json`` (a JSON object with "model", "recipe", "args")."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and RUN_CONFIG_KEYS <= set(config)


def run_folder_of(checkpoint: str | os.PathLike) -> Path | None:
    """The run folder of a checkpoint at ``<run>/checkpoints/<step:07d>.pt`` (``is_run_folder(<run>)``); None for a
    checkpoint anywhere else."""
    p = Path(os.path.abspath(checkpoint))
    run = p.parent.parent
    if CHECKPOINT_FILE.match(p.name) and p.parent.name == "checkpoints" and is_run_folder(run):
        return run
    return None


def discard_if_empty(run: str | os.PathLike) -> bool:
    """Remove the run folder ``run`` if it holds no checkpoint (a new run stopped before its first save: by an
    error, Ctrl-C or SIGTERM in its first seconds), so that no folder is left that ``--resume auto`` would pick
    up and find nothing in. Returns whether it was removed."""
    run = Path(run)
    ckpts = run / "checkpoints"
    if not run.is_dir() or (ckpts.is_dir() and any(CHECKPOINT_FILE.match(p.name) for p in ckpts.iterdir())):
        return False
    shutil.rmtree(run, ignore_errors=True)
    return True


class RunLock:
    """An exclusive lock on a run folder for as long as this object lives (``acquire`` / ``release``, or a
    context manager). ``UserError`` naming the holder's PID when another process has it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise UserError(f"run folder {self.folder} is in use by {who} (a live `dit-fast train`); wait for it to "
                            "end, or train into another --results-dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock; the file stays (removing it would race)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
