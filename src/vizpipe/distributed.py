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
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (unchanged for one process).

    CPU tensors are moved to the GPU and back when the backend is NCCL.
    """
    if is_initialized():
        staged = tensor.to(_collective_device())
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        tensor.copy_(staged)
    return tensor


def broadcast(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with its value on rank ``source``, in place."""
    if is_initialized():
        staged = tensor.to(_collective_device())
        dist.broadcast(staged, src=source)
        tensor.copy_(staged)
    return tensor


def broadcast_module(module: torch.nn.Module, source: int = 0) -> None:
    """Give every rank rank ``source``'s parameters and buffers."""
    if not is_initialized():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            broadcast(tensor, source)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()
