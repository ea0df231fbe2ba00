"""Process-group setup for tensor parallelism, and the few collectives the layers use.

Rank 0 (the Engine's process) opens a ``TCPStore`` on 127.0.0.1 on a free port the OS picks;
workers join it. Each rank then builds its own process group object (gloo on CPU, NCCL on CUDA,
one device per rank) without touching ``torch.distributed``'s global default group, so several
tensor-parallel Engines can live in one process. Every collective has the group's timeout: a peer
that hangs becomes an error on the others after ``timeout`` seconds, and a peer that dies closes
its connections, which gloo reports at once.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["COLLECTIVE_TIMEOUT_S", "Comm", "join_group", "open_store"]

#: How long a collective may wait for its peers before failing (a hung worker, a stalled device).
COLLECTIVE_TIMEOUT_S = 120.0
_HOST = "127.0.0.1"


def open_store(world: int, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> dist.TCPStore:
    """The rendezvous store on rank 0, listening on a port the OS chose (``store.port``)."""
    return dist.TCPStore(
        _HOST, 0, world, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def join_group(
    store: dist.Store | int, rank: int, world: int, device: torch.device, timeout_s: float = COLLECTIVE_TIMEOUT_S
) -> Comm:
    """This rank's group: ``store`` is rank 0's store object, or its port for a worker."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if isinstance(store, int):
        store = dist.TCPStore(_HOST, store, world, False, timeout=timeout)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg: Any = dist.ProcessGroupNCCL(store, rank, world, opts)
    else:
        pg = dist.ProcessGroupGloo(store, rank, world, timeout)
    return Comm(rank, world, device, pg)


class Comm:
    """One rank's view of its group. With ``world == 1`` (no group) every collective is the identity,
    which is how sharded shapes are built and checked without processes."""

    __slots__ = ("device", "pg", "rank", "world")

    def __init__(self, rank: int, world: int, device: torch.device, pg: Any = None) -> None:
        # ``pg``: a gloo or NCCL backend object (their allreduce/broadcast/gather API), or None.
        self.rank, self.world, self.device, self.pg = rank, world, device, pg

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks (a new tensor when ``t`` was not contiguous)."""
        if self.pg is None:
            return t
        t = t.contiguous()
        self.pg.allreduce([t]).wait()
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` filled, on every rank, with rank ``src``'s values (in place; ``t`` must be contiguous)."""
        if self.pg is not None:
            opts = dist.BroadcastOptions()
            opts.rootRank = src
            self.pg.broadcast([t], opts).wait()
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``t`` (same shapes) on rank 0; None on the others."""
        if self.pg is None:
            return [t]
        t = t.contiguous()
        out = [[torch.empty_like(t) for _ in range(self.world)]] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.pg.gather(out, [t], opts).wait()
        return out[0] if self.rank == 0 else None

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shapes) on every rank."""
        if self.pg is None:
            return [t]
        t = t.contiguous()
        out = [[torch.empty_like(t) for _ in range(self.world)]]
        self.pg.allgather(out, [t]).wait()
        return out[0]
