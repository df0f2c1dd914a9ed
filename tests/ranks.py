"""Run a function in several local processes joined by a gloo group: 2 CPU "ranks" for tests."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp.core import distributed as vdist
from vlp.core.distributed import destroy_distributed, find_free_port, init_distributed


def _local_rank_main(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    """Child-process entry of `run_local_ranks`: launcher-like env, process group, fn, teardown."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # ranks share the machine's cores
    init_distributed(backend="gloo")
    try:
        fn(rank, world_size, *args)
    finally:
        destroy_distributed()


def run_local_ranks(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes joined by a gloo group.

    For tests and single-node CPU experiments: fn must be importable (module level). An
    exception in any rank is re-raised here with its traceback. The ranks are forked, not
    spawned: each starts with this process's imports instead of paying them again (seconds
    per rank on 2 cores), and runs one thread, as a DataLoader worker does after a fork.
    """
    mp.start_processes(_local_rank_main, args=(world_size, find_free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="fork")


def reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a per-rank scalar over all ranks (for logging per-rank loss terms)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(())
    if vdist.is_distributed() and dist.get_backend() != "nccl":
        dist.all_reduce(t)
        t /= dist.get_world_size()
    elif vdist.is_distributed():
        t = t.cuda()
        dist.all_reduce(t)
        t = t.cpu() / dist.get_world_size()
    return float(t)
