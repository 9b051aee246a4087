"""Key statistics under ``torch.distributed``: which rank reads what, and how the sums are combined.

Every rank reads its share of a tensor or map-style dataset (images ``rank, rank + world, ...``), the
float64 sums and counts are added with ``all_reduce``, and every rank gets the same statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, Subset

from surgery.errors import SurgeryError

__all__ = ["process_group", "shard", "all_ranks", "all_reduce_sums"]


def process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` when a torch.distributed process group with several ranks is running."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def shard(data: Any, rank: int, world: int, max_images: int | None = None) -> Any:
    """This rank's part of ``data``: images ``rank, rank + world, ...`` of the first ``max_images``.

    Tensors and map-style datasets are split here. DataLoaders and other iterables are taken to be
    this rank's shard already (give them a ``DistributedSampler``), and cannot take ``max_images``.
    """
    if isinstance(data, torch.Tensor):
        return data[:max_images][rank::world]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        n = len(data) if max_images is None else min(len(data), max_images)
        return Subset(data, range(rank, n, world))
    if max_images is not None:
        raise SurgeryError(
            "under torch.distributed, max_images applies to tensors and datasets that collect_key_stats "
            "splits itself; for a DataLoader, limit the images in its DistributedSampler instead"
        )
    return data


def all_ranks(flag: bool, group: tuple[int, int] | None, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (just ``flag`` without a process group)."""
    if group is None:
        return flag
    t = torch.tensor([int(flag)], device=_reduce_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _reduce_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sums(s: torch.Tensor, count: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Add the float64 sums and the counts of every rank; every rank gets the totals."""
    where = _reduce_device(device)
    total = s.to(where, torch.float64)
    n = torch.tensor([count], dtype=torch.int64, device=where)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    dist.all_reduce(n, op=dist.ReduceOp.SUM)
    return total, int(n.item())
