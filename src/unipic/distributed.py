"""Process-level sharding for batch jobs started with `accelerate launch` (or torchrun).

Batch generation and evaluation only need each process to take a disjoint share of the work,
so we read the rank from the environment rather than initialising a process group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def process_rank_and_world() -> tuple[int, int]:
    """Return (rank, world_size) from the launcher's environment; (0, 1) for a plain run."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world


def process_shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This process's share of `items`: every world_size-th item starting at rank (none twice)."""
    if rank is None or world_size is None:
        rank, world_size = process_rank_and_world()
    return list(items[rank::world_size])
