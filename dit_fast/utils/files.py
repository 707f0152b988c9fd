"""Atomic file output: every file or folder dit-fast writes appears whole or not at all.

``atomic_write(path, write)`` has ``write`` fill a temporary path in the same folder (a file, or a folder with
``directory=True``), flushes it to disk and renames it over ``path`` with ``os.replace`` (atomic on POSIX); a crash
or an exception leaves the previous file (or nothing) and no temporary behind. Checkpoints, sample grids, ``.npz``
files and latent folders are all written through it.

Temporaries are named ``.<name>.<pid>@<host>.<random>.tmp`` (the name shortened so the whole fits the file system's
NAME_MAX): a process killed outright (SIGKILL, power loss) leaves one behind, and ``sweep_stale_temps`` removes
those of ``path`` whose process, on this host, is gone, never a live writer's. A full disk while writing is one
``DiskFull`` error naming the file and the free space, with the temporary removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dit_fast.utils.lifecycle import pause_point
from dit_fast.utils.validation import UserError, format_bytes

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\.(?P<name>.*)\.(?P<pid>\d+)@(?P<host>[0-9a-f]{8})\.[0-9a-f]{8}\.tmp$")
_TEMP_EXTRA = len(".@.12345678.tmp") + 8 + 10  # everything but the name: dots, host, random, a 10-digit pid
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(UserError, OSError):
    """No room left (or the quota or file-size limit reached) while writing a file; the temporary was removed."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing ancestor) allows."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def temp_path(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this call and naming this process: ``.<name>.<pid>@<host>.<rand>.tmp``,
    with ``name`` shortened when the whole would exceed the file system's NAME_MAX."""
    return path.with_name(f".{_short_name(path)}.{os.getpid()}@{_HOST}.{uuid.uuid4().hex[:8]}.tmp")


def _short_name(path: Path) -> str:
    room = name_max(path.parent) - _TEMP_EXTRA
    return os.fsencode(path.name)[: max(room, 1)].decode(errors="ignore")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` (files or folders beside it) left by processes of this host that are
    gone; returns what was removed. A live writer's temporary, or another host's, is never touched."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    name = _short_name(path)
    removed = []
    for entry in path.parent.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or m["name"] != name or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def sweep_stale_temps_in(folder: str | os.PathLike) -> list[Path]:
    """``sweep_stale_temps`` for every name in ``folder`` (a checkpoints folder, whose writers are one run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = {m["name"] for e in folder.iterdir() if (m := _TEMP.match(e.name))}
    return [p for name in sorted(names) for p in sweep_stale_temps(folder / name)]


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is ENOSPC, EDQUOT or EFBIG."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(path: str | os.PathLike, error: BaseException) -> DiskFull:
    """The one-line ``DiskFull`` for ``error`` while writing ``path``."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists():
        folder = folder.parent
    free = format_bytes(shutil.disk_usage(folder).free)
    reason = next((os.strerror(e.errno) for e in (error, error.__cause__, error.__context__)
                   if isinstance(e, OSError) and e.errno in _DISK_FULL), "no space left on device")
    return DiskFull(f"{reason} while writing {path} ({free} free on {folder}); nothing was written, "
                                  "free some space and run again")


def preallocate(path: str | os.PathLike, size: int) -> None:
    """Reserve ``size`` bytes for the existing file ``path`` (``os.posix_fallocate``), so that a memory map of it
    can never fault on a full disk (SIGBUS); ``DiskFull`` when the room is not there. Where the file system cannot
    preallocate, the file is extended with written zeros instead, which fails the same way."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise disk_full_error(path, e) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            _fill(fd, size, path)
    finally:
        os.close(fd)


def _fill(fd: int, size: int, path: str | os.PathLike) -> None:
    chunk = bytes(1 << 20)
    done = os.fstat(fd).st_size
    os.lseek(fd, done, os.SEEK_SET)
    try:
        while done < size:
            done += os.write(fd, chunk[: min(len(chunk), size - done)])
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise disk_full_error(path, e) from None
        raise


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # folders cannot be opened for syncing on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, directory: bool = False) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` writes a temporary file (or fills a temporary folder, created
    for it, when ``directory``), which is fsynced and renamed onto ``path``. Returns ``path``.

    A file replaces an existing one; a folder may only replace an empty folder (callers check first). Any error,
    Ctrl-C or SIGTERM (raised as an exception) removes the temporary; a full disk raises ``DiskFull``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    pause_point(f"write {path.name}")  # fault-injection tests: nothing written yet
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
        pause_point(f"written {path.name}")  # fault-injection tests: the temporary is complete, not yet renamed
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, Exception) and not isinstance(e, DiskFull) and is_disk_full(e):
            raise disk_full_error(path, e) from None
        raise
    _fsync(path.parent)  # make the rename durable
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (``atomic_write``): the file is whole or absent. The file is
    written through a Python file object, so a full disk surfaces as ENOSPC (``DiskFull``), not as torch's
    "unexpected pos" enforce failure."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)
