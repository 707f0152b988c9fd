"""Atomic file output: every file or folder dit-fast writes appears whole or not at all.

``atomic_write(path, write)`` has ``write`` fill a temporary path in the same folder (a file, or a folder with
``directory=True``), flushes it to disk and renames it over ``path`` with ``os.replace`` (atomic on POSIX); a crash
or an exception leaves the previous file (or nothing) and no temporary behind. Checkpoints, sample grids, ``.npz``
files and latent folders are all written through it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def temp_path(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this call: ``.<name>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # folders cannot be opened for syncing on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, directory: bool = False) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` writes a temporary file (or fills a temporary folder, created
    for it, when ``directory``), which is fsynced and renamed onto ``path``. Returns ``path``.

    A file replaces an existing one; a folder may only replace an empty folder (callers check first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        if directory:
            tmp.mkdir()
            write(tmp)
            for child in tmp.rglob("*"):
                if child.is_file():
                    _fsync(child)
        else:
            write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # make the rename durable
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (``atomic_write``): the file is whole or absent."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
