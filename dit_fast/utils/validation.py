"""Checks on user input, made before any work starts, and the errors the ``dit-fast`` command reports in one line.

No torch here: the command checks its arguments before loading anything heavy.

- Numeric options: ``int_range(min, max)`` and ``float_range(min, max)`` parse a string and raise a ``ValueError``
  for out-of-range and non-finite values (``must be an integer >= 1, got '-5'``); the commands use them as argparse
  types (``dit_fast.commands.arguments``: a usage error, exit status 2), ``TrainConfig.check`` on its fields.
- Output paths: ``check_output_file`` / ``check_output_dir`` make sure a path can be written (its folder exists or
  can be made, is writable, the path is not a folder where a file is meant, and the disk has room) before any model
  is loaded, so a run never computes for hours and then fails to save.
- ``UserError``: bad input or an environment the user can fix. The command prints its message as one line on stderr
  and exits with status 1 (as for the ``ValueError`` and ``OSError`` it derives from or sits beside); ``--debug``
  shows the traceback. ``Interrupted``: a run stopped by a signal after saving its state; the command prints the
  message and exits with status 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

SEED_MAX = 2**32 - 1  # seeds are mixed as 32-bit words (numpy's SeedSequence): a larger one would alias a smaller


class UserError(ValueError):
    """Bad input or an environment the user can fix; the message says what is wrong (and what to do)."""


class Interrupted(Exception):
    """A run stopped by ``signum`` (SIGINT, SIGTERM) after saving what it had done; ``exit_code`` = 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# ---------------------------------------------------------------------------------------------------- numbers

def _bounds(min_value: float | None, max_value: float | None) -> str:
    if min_value is not None and max_value is not None:
        return f"in [{min_value}, {max_value}]"
    if min_value is not None:
        return f">= {min_value}"
    return f"<= {max_value}" if max_value is not None else ""


def int_range(min_value: int | None = None, max_value: int | None = None) -> Callable[[str], int]:
    """A parser of integers in ``[min_value, max_value]`` (either bound optional); ValueError otherwise."""
    what = " ".join(["an integer", _bounds(min_value, max_value)]).strip()

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be {what}, got {text!r}") from None
        if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
            raise ValueError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(min_value: float | None = None, max_value: float | None = None, *,
                exclusive_min: bool = False) -> Callable[[str], float]:
    """A parser of finite floats in ``[min_value, max_value]`` (``(min_value, ...`` with ``exclusive_min``); NaN and
    infinities are always rejected (ValueError)."""
    if exclusive_min and min_value is not None:
        what = f"a finite number > {min_value}" + (f" and <= {max_value}" if max_value is not None else "")
    else:
        what = " ".join(["a finite number", _bounds(min_value, max_value)]).strip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be {what}, got {text!r}") from None
        too_low = min_value is not None and (value <= min_value if exclusive_min else value < min_value)
        if not math.isfinite(value) or too_low or (max_value is not None and value > max_value):
            raise ValueError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0.0, exclusive_min=True)


# ---------------------------------------------------------------------------------------------------- output paths

def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _writable_folder(folder: Path, label: str) -> Path:
    """The nearest existing ancestor of ``folder`` (``folder`` itself if it exists), checked to be a folder this
    process can create files in; UserError otherwise. Nothing is left behind."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{label}: {existing} is a file, not a folder")
    try:  # the real test (permissions, read-only or special file systems, quotas); os.access misleads root
        fd, probe = tempfile.mkstemp(prefix=".dit-fast-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise UserError(f"{label}: cannot write in {existing} ({reason})") from None
    return existing


def check_free_space(folder: str | os.PathLike, size_bytes: int, label: str) -> None:
    """UserError if the file system holding ``folder`` (or its nearest existing ancestor) has less than
    ``size_bytes`` free."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if size_bytes > free:
        raise UserError(f"{label}: needs about {format_bytes(size_bytes)}, but only {format_bytes(free)} is free "
                        f"on {existing}")


def check_output_file(path: str | os.PathLike, option: str, *, size_bytes: int = 0, overwrite: bool = True,
                      example: str = "out") -> Path:
    """Check that the file ``path`` can be written: it is not a folder (nor, without ``overwrite``, an existing
    file), its folder exists or can be made and is writable, and ``size_bytes`` fit on the disk.

    ``option`` names it in the message (e.g. "--npz"), ``example`` is a file name the message suggests for a
    folder. Returns ``path`` as a Path. Creates nothing.
    """
    path = Path(path)
    label = f"{option} {path}"
    if path.is_dir():
        raise UserError(f"{label} is a folder; give a file path, e.g. {path / example}")
    if path.exists() and not overwrite:
        raise UserError(f"{label} exists; pass --overwrite to replace it")
    folder = _writable_folder(path.parent, label)
    if size_bytes:
        check_free_space(folder, size_bytes, label)
    return path


def check_output_dir(path: str | os.PathLike, option: str, *, must_not_exist: bool = False,
                     size_bytes: int = 0) -> Path:
    """Check that the folder ``path`` exists or can be made and is writable (and, with ``must_not_exist``, does not
    exist yet), and that ``size_bytes`` fit on its disk. Creates nothing."""
    path = Path(path)
    label = f"{option} {path}"
    if path.exists() and not path.is_dir():
        raise UserError(f"{label} is a file, not a folder")
    if must_not_exist and path.exists():
        raise UserError(f"{label} exists already")
    folder = _writable_folder(path, label)
    if size_bytes:
        check_free_space(folder, size_bytes, label)
    return path
