"""Processes: joining the ``torchrun`` process group, this process's place in it, the few collectives the scripts
need (a mean or maximum over ranks, an object from rank 0, gathering objects, a barrier), ``StopSignals``, which
turns Ctrl-C and SIGTERM into a request that every process sees at the same training step, and preparing a
model's blocks for sharded training (``compile_blocks`` then ``shard_blocks``).

Every helper is a no-op in a single process, so training and sampling call them unconditionally. Launched by
``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set), ``setup_distributed`` joins with nccl on GPUs and gloo on
CPUs; ``cleanup`` leaves the group.
"""

from __future__ import annotations

import gc
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dit_fast.utils.environment import read_dist_env


@dataclass(frozen=True)
class Dist:
    """This process's place: rank, world size, local rank, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None) -> Dist:
    """Join the ``torchrun`` process group if launched by torchrun (nccl on GPU, gloo on CPU), else one process.

    ``device``: "cuda", "cuda:N", "cpu" or None (cuda when available); on CUDA each process takes GPU
    ``LOCAL_RANK``. The torchrun variables are checked first (``environment.read_dist_env``: a half-set or
    malformed environment is a UserError naming the variable); RuntimeError when CUDA is requested and absent.
    """
    env = read_dist_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size, rank, local_rank = env.world_size, env.rank, env.local_rank
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, dev)


def cleanup(d: Dist, *, finished: bool = False) -> None:
    """Leave the process group (if this process joined one).

    ``finished``: every process got here on the success path. They then meet at a barrier first, and the objects
    left over from the run (FSDP's sharded modules hold the group's collectives) are collected before the group is
    destroyed: a process never tears down its gloo pairs while a peer still talks on them, and no group outlives
    the interpreter (either can abort a process at exit with "terminate called without an active exception"
    after its work is done). On a failure path there is no barrier: a peer that died would leave it hanging.
    """
    if d.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
            gc.collect()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait for every process."""
    if d.enabled:
        dist.barrier()


def all_reduce_mean(value: float, d: Dist) -> float:
    """The mean of ``value`` over all processes (float64 all-reduce)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world_size


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every process (picklable objects)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, d: Dist) -> list[Any]:
    """Every process's ``obj``, in rank order (picklable objects)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(value: int, d: Dist) -> int:
    """The largest of the processes' ``value``."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class StopSignals:
    """While active (a context manager), SIGINT (Ctrl-C) and SIGTERM do not kill the process but are recorded in
    ``signum``: the training loop asks ``requested(d)`` after each step, then saves a checkpoint and exits. A second
    Ctrl-C quits at once (KeyboardInterrupt). Signal handlers belong to the main thread; elsewhere nothing changes.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def requested(self, d: Dist) -> bool:
        """Whether any process got a signal; all of them then record it, so that they stop at the same step."""
        if d.enabled:
            self.signum = all_reduce_max(self.signum or 0, d) or None
        return self.signum is not None


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile`` every block of ``model.blocks`` in place (``fullgraph=True``, ``dynamic=False``, plus
    ``compile_kwargs``) and return ``model``: regional compilation, the blocks share their compiled graphs.

    For FSDP2 call it before ``shard_blocks`` (torchtitan's order): each block is compiled as the plain module it is,
    and ``fully_shard`` then wraps the compiled block, its all-gather and reduce-scatter around that one graph.
    """
    for block in model.blocks:
        block.compile(**{"fullgraph": True, "dynamic": False, **compile_kwargs})
    return model


def shard_blocks(model: nn.Module, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """FSDP2 (``fully_shard``) in place, one unit per block of ``model.blocks`` and one for the rest; returns it.
    ``mp_policy``: FSDP2's mixed precision (None: parameters, all-gathers and reductions in the parameters' dtype)."""
    options = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def mixed_precision_policy(param_dtype: torch.dtype) -> MixedPrecisionPolicy | None:
    """FSDP2 mixed precision for training in ``param_dtype`` (bf16): the sharded fp32 master parameters are cast
    to bf16 once per all-gather (half the all-gather traffic, no per-op autocast casts), gradients are reduced in
    fp32 (``reduce_dtype``) and land on the fp32 shards the optimizer updates. None for fp32 training."""
    if param_dtype == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def compile_and_shard(model: nn.Module, ema: nn.Module | None = None, *, compile: bool, fsdp: bool,
                      param_dtype: torch.dtype = torch.float32, **compile_kwargs: Any) -> None:
    """Prepare a DiT (and its EMA copy) for training, in place.

    ``compile`` alone: ``model.compile(**compile_kwargs)`` (DiTFast compiles its blocks, the reference whole). With
    ``fsdp``: the blocks are compiled first (``compile_blocks``), then ``model`` and ``ema`` are sharded
    (``shard_blocks``): compile before ``fully_shard``, as torchtitan does; ``model`` with the mixed precision of
    ``param_dtype`` (``mixed_precision_policy``), the EMA copy in fp32. The EMA copy is never compiled.
    """
    if fsdp and not dist.is_initialized():
        raise ValueError("--fsdp needs several processes (launch with torchrun)")
    if compile:
        if fsdp:
            compile_blocks(model, **compile_kwargs)
        else:
            model.compile(**compile_kwargs)
    if fsdp:
        shard_blocks(model, mixed_precision_policy(param_dtype))
        if ema is not None:
            shard_blocks(ema)
