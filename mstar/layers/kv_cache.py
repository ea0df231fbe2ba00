"""A slot-based KV cache: each running request owns one slot of a preallocated buffer.

The buffer is allocated once (``num_slots x max_len`` positions per layer), so
memory is bounded and known up front; a request never pays for another
request's length, and a decode step reads only up to the longest live context
in the batch. When no slot is free a new request waits (``allocate`` returns
None) instead of evicting anyone.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Keys and values for ``num_layers`` layers, ``num_slots`` requests, ``max_len`` positions each."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots = num_slots
        self.max_len = max_len
        #: Tokens already stored per slot (the next write position).
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    # ---- accounting
    @property
    def slots_used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def slots_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    # ---- slot life cycle
    def allocate(self) -> int | None:
        """Take a free slot (its length reset to 0), or None when all are in use."""
        if not self._free:
            return None
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            return
        self.lengths[slot] = 0
        self._free.append(slot)

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy the first ``length`` positions of ``src`` into ``dst`` (shared-prefix branches)."""
        n = self.lengths[src] if length is None else length
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def room(self, slot: int) -> int:
        """Positions still free in ``slot``."""
        return self.max_len - self.lengths[slot]
