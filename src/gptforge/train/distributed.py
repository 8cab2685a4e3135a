"""torch.distributed helpers: one process per device, launched by ``torchrun``.

Without ``WORLD_SIZE`` > 1 in the environment everything here is a cheap no-op, so the training loop
reads the same in one process and in many.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False
    """True when :func:`init_distributed` created the group (and so must destroy it)."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any; pick the device.

    gloo on CPU, nccl on CUDA. Each CUDA process takes the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), resolve_device(device_name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
    log.info("process %d of %d on %s", rank, world_size, device)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, owns_process_group=owns), device


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: float, ctx: DistContext, device: torch.device) -> float:
    """The mean of ``value`` over all processes (the value itself in one process)."""
    if not ctx.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / ctx.world_size


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every process (decisions such as "stop now" must agree everywhere)."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def max_over_processes(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """The element-wise maximum of ``values`` over all processes (the values themselves in one process):
    one all-reduce for several flags that every process must agree on."""
    if not ctx.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
