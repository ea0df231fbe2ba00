"""The one accounting schema every runner reports: KV use and work per component.

Torch-free: the server, the benchmarks and (later) the metrics endpoint read
it. ``Engine.stats()`` merges it with the scheduler's counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Activity", "KVAccounting", "RunnerStats"]


class KVAccounting(Protocol):
    """What :meth:`RunnerStats.of_caches` reads from a KV cache (see mstar.layers.kv_cache)."""

    @property
    def slots_used(self) -> int: ...
    num_slots: int
    @property
    def nbytes(self) -> int: ...
    @property
    def blocks_used(self) -> int: ...
    @property
    def usable_blocks(self) -> int: ...
    prefix_hit_tokens: int
    prefix_queried_tokens: int


@dataclass(slots=True)
class Activity:
    """Batched calls per component (``"prefill"``, ``"decode"``, ``"snac"``, ``"denoise"`` ...).

    ``forwards[c]`` counts calls of component ``c``, ``rows[c]`` the rows
    (requests, codec windows, CFG branches) they processed, and ``last_rows[c]``
    the rows of the most recent call: what batching tests and benchmarks check.
    """

    forwards: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    last_rows: dict[str, int] = field(default_factory=dict)

    def record(self, component: str, rows: int) -> None:
        self.forwards[component] = self.forwards.get(component, 0) + 1
        self.rows[component] = self.rows.get(component, 0) + rows
        self.last_rows[component] = rows


@dataclass(slots=True)
class RunnerStats:
    """What a runner holds and has done. KV figures add up every cache the runner owns.

    Slots are requests holding KV; blocks are the paged pool's units
    (``kv_blocks_used`` counts blocks held by requests, cached idle blocks are
    free). ``prefix_hit_tokens`` of ``prefix_queried_tokens`` prompt tokens were
    found in the prefix cache; ``preemptions`` counts requests paused to free blocks.
    """

    kv_slots_used: int = 0
    kv_slots_total: int = 0
    kv_bytes: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_hit_tokens: int = 0
    prefix_queried_tokens: int = 0
    preemptions: int = 0
    activity: Activity = field(default_factory=Activity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kv_slots_used": self.kv_slots_used,
            "kv_slots_total": self.kv_slots_total,
            "kv_bytes": self.kv_bytes,
            "kv_blocks_used": self.kv_blocks_used,
            "kv_blocks_total": self.kv_blocks_total,
            "kv_blocks_free": self.kv_blocks_total - self.kv_blocks_used,
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "prefix_queried_tokens": self.prefix_queried_tokens,
            "preemptions": self.preemptions,
            "forwards": dict(self.activity.forwards),
            "rows": dict(self.activity.rows),
            "last_rows": dict(self.activity.last_rows),
        }

    @classmethod
    def of_caches(cls, *caches: KVAccounting, activity: Activity, reserved_slots: int = 0, preemptions: int = 0) -> RunnerStats:
        """The KV figures of every cache a runner owns, added up; ``reserved_slots`` are the
        runner's own (a CUDA-graph padding slot) and count neither as used nor as total."""
        return cls(
            kv_slots_used=sum(c.slots_used for c in caches) - reserved_slots,
            kv_slots_total=sum(c.num_slots for c in caches) - reserved_slots,
            kv_bytes=sum(c.nbytes for c in caches),
            kv_blocks_used=sum(c.blocks_used for c in caches),
            kv_blocks_total=sum(c.usable_blocks for c in caches),
            prefix_hit_tokens=sum(c.prefix_hit_tokens for c in caches),
            prefix_queried_tokens=sum(c.prefix_queried_tokens for c in caches),
            preemptions=preemptions,
            activity=activity,
        )
