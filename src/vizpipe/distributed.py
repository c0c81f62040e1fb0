"""torch.distributed helpers: the only module that calls torch.distributed directly.

Under ``torchrun`` every process runs the same job; analyses shard their work
with ``shard`` and combine it with ``all_reduce_sum`` or ``all_gather_rows``.
Without torchrun (no ``WORLD_SIZE`` in the environment) every helper is a
no-op for a single process, so library code can call them unconditionally.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialize(device: torch.device) -> bool:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on CUDA).

    Returns True when this process is one of several. Safe to call twice.
    """
    if not launched_by_torchrun():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        log.info("Joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, which alone writes files and logs to MLflow."""
    return rank() == 0


def shard(count: int) -> range:
    """Indices ``0..count-1`` owned by this rank: a contiguous, nearly equal block."""
    size, index = world_size(), rank()
    base, extra = divmod(count, size)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (unchanged for one process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()
