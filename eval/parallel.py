"""Split encoding work across the processes of a launch and put the results back together.

Under torchrun / accelerate / SLURM every rank runs the whole suite; only the
encoding is split. Rank r encodes items r, r + W, r + 2W, ... (a strided
share, so slow items such as http fetches spread evenly), then the features
are all-gathered with torch.distributed and put back in item order on every
rank, so each rank computes the same metrics and rank 0 writes the report.
With one process everything here is a no-op. gloo (CPU) and nccl both work:
features travel as a fixed-size padded tensor, failures as small objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from vlp.core.distributed import rank_and_world

T = TypeVar("T")


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The strided share of `items` that `rank` encodes."""
    return list(items[rank::world])


def _comm_device() -> torch.device:
    """nccl only moves CUDA tensors; gloo moves CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_strided(local: torch.Tensor, total: int, dim: int) -> torch.Tensor:
    """Reassemble per-rank strided shares (rank r holds items r, r+W, ...) into (total, dim), item order."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    per = math.ceil(total / world)
    padded = torch.zeros(per, dim, dtype=torch.float32, device=_comm_device())
    padded[: local.shape[0]] = local.to(padded.device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    stacked = torch.stack(parts, dim=1).reshape(
        per * world, dim
    )  # row i*W + r = rank r's i-th = item i*W + r
    return stacked[:total].cpu()


def gather_objects(local: list) -> list:
    """Concatenate small per-rank lists of picklable objects (failure records) on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return list(local)
    parts: list[list | None] = [None] * world
    dist.all_gather_object(parts, list(local))
    return [x for part in parts for x in (part or [])]


def broadcast_from_main(value: object) -> object:
    """Rank 0's `value` on every rank (also a barrier): e.g. whether rank 0's preparation failed."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op alone): e.g. rank 0 writes synthetic data, the others then read it."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def run_sharded(
    items: Sequence[T], encode: Callable[[list[T]], tuple[torch.Tensor, list[tuple[int, object]]]], dim: int
) -> tuple[torch.Tensor, list[tuple[int, object]]]:
    """Encode `items` split across ranks; return (features in item order, [(item index, failure)]).

    `encode(my_items)` returns features for all of `my_items` (zero rows for
    failures) and failures indexed within `my_items`; indices are mapped back
    to positions in `items` before gathering.
    """
    rank, world = rank_and_world()
    mine = share(items, rank, world)
    feats, failures = encode(mine)
    if feats.shape[0] != len(mine):
        raise RuntimeError(f"encoder returned {feats.shape[0]} rows for {len(mine)} items")
    global_failures = [(rank + i * world, f) for i, f in failures]
    return gather_strided(feats, len(items), dim), sorted(gather_objects(global_failures), key=lambda x: x[0])
