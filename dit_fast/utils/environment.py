"""The process's environment, checked before any work: the distributed variables, device names, memory.

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``). A stray or
half-set environment (``RANK=1`` left exported in a shell, ``WORLD_SIZE=abc``) used to make ``sample`` exit 0
having written nothing (rank 1 of 1 never writes) or ``train`` fail with a TypeError. ``read_dist_env`` accepts
either none of the variables (one process) or a consistent set, and otherwise raises ``UserError`` naming each
variable and its value.

``device_name`` checks a ``--device`` value (cpu, cuda, cuda:N: dit-fast runs nowhere else; "mps" or
"meta" used to fail deep inside a model); ``check_memory`` refuses work whose host memory cannot exist
(``--num-samples 10**12``) before the allocator is asked for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from dit_fast.utils.validation import UserError, format_bytes

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")

RANK_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
LAUNCH_HINT = "launch several processes with torchrun, or unset the variables to run one process"


@dataclass(frozen=True)
class DistEnv:
    """``rank`` of ``world_size`` processes; ``local_rank`` picks the GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _int_var(env: Mapping[str, str], name: str, minimum: int) -> int:
    text = env[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={env[name]!r} is not an integer ({LAUNCH_HINT})") from None
    if value < minimum:
        raise UserError(f"environment variable {name}={value} must be >= {minimum} ({LAUNCH_HINT})")
    return value


def read_dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """This process's place from ``env`` (default ``os.environ``), checked: all of WORLD_SIZE and RANK or neither,
    integers, 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0, and MASTER_ADDR / MASTER_PORT for more than one process."""
    env = os.environ if env is None else env
    present = {name for name in RANK_VARS if env.get(name, "").strip() != ""}
    if not present:
        return DistEnv()
    for needed in ("WORLD_SIZE", "RANK"):
        if needed not in present:
            others = ", ".join(f"{n}={env[n]}" for n in RANK_VARS if n in present)
            raise UserError(f"{others} is set but {needed} is not: a half-set torchrun environment ({LAUNCH_HINT})")
    world_size = _int_var(env, "WORLD_SIZE", 1)
    rank = _int_var(env, "RANK", 0)
    local_rank = _int_var(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in present else rank
    if rank >= world_size:
        raise UserError(f"environment variable RANK={rank} must be < WORLD_SIZE={world_size} ({LAUNCH_HINT})")
    if world_size > 1:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n, "").strip()]
        if missing:
            raise UserError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} unset ({LAUNCH_HINT})")
        _int_var(env, "MASTER_PORT", 1)
    return DistEnv(rank, world_size, local_rank)


def device_name(text: str) -> str:
    """``text`` if it is "cpu", "cuda" or "cuda:N" (the devices dit-fast runs on); ValueError otherwise."""
    if not _DEVICE.match(text.strip()):
        raise ValueError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text.strip()


def available_memory() -> int | None:
    """Bytes of host memory available to new allocations (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(size_bytes: int, label: str) -> None:
    """UserError when ``size_bytes`` of host memory are more than what is available (``label`` says for what)."""
    free = available_memory()
    if free is not None and size_bytes > free:
        raise UserError(f"{label} need about {format_bytes(size_bytes)} of memory, but {format_bytes(free)} is "
                        "available")
