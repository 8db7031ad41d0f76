"""Data parallelism for training stages: who am I, how many are we. No torch import at module level.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init_from_env` joins the
process group (NCCL on GPUs, gloo on CPUs). Stages only ask `current_world()`, so the same code runs in
one process or many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True in a process that torchrun started with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> World:
    """Join the job torchrun started (idempotent); a plain process is a world of one."""
    import torch
    import torch.distributed as dist

    if not launched():
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return current_world()


def current_world() -> World:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def device_for(world: World) -> Any:
    import torch

    return torch.device(f"cuda:{world.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def all_mean(value: float, world: World) -> float:
    """The mean of a float over every rank (the value itself in a world of one)."""
    if world.size == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world.size


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is true on any (so all ranks stop at the same step)."""
    if world.size == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)
