"""The one accounting schema every runner reports: KV use and work per component.

Torch-free: the server, the benchmarks and (later) the metrics endpoint read
it. ``Engine.stats()`` merges it with the scheduler's counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Activity", "RunnerStats"]


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
    """What a runner holds and has done. KV figures add up every cache the runner owns."""

    kv_slots_used: int = 0
    kv_slots_total: int = 0
    kv_bytes: int = 0
    activity: Activity = field(default_factory=Activity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kv_slots_used": self.kv_slots_used,
            "kv_slots_total": self.kv_slots_total,
            "kv_bytes": self.kv_bytes,
            "forwards": dict(self.activity.forwards),
            "rows": dict(self.activity.rows),
            "last_rows": dict(self.activity.last_rows),
        }
