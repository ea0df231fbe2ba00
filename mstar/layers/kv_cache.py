"""A paged KV cache: fixed-size blocks, a block table per request, prefix sharing.

Keys and values live in one pool of ``num_blocks`` blocks of ``block_size``
positions per layer, laid out ``[layers, blocks, block_size, kv_heads, head_dim]``
(the layout paged-attention kernels such as FlashAttention's read in place).
A request holds a *slot*: a handle with a block table and a length. Blocks are
taken from the pool only as its tokens arrive (:meth:`KVCache.reserve`), so
memory in use follows the tokens requests actually hold, and a request that
cannot grow waits or is preempted by its runner instead of being truncated.

Sharing, by reference counts:

* :meth:`KVCache.copy_slot` gives a branch (BAGEL's guidance contexts) the
  full blocks of its parent without copying them; a block is copied only
  when a holder writes into it while another still reads it (copy on write).
* Prefix caching: :meth:`KVCache.register_prefix` names each full block of a
  prompt by a hash of all the tokens up to its end, and :meth:`KVCache.match_prefix`
  attaches the longest run of such blocks to a new request, which then skips
  their prefill. Blocks nobody holds stay cached (least recently used are
  reused first) until the pool needs them.

Block 0 is never handed out: unused block-table entries point at it, and the
attention masks never read it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from mstar.errors import ServiceError

__all__ = ["KVCache", "KVCacheFullError"]

NULL_BLOCK = 0


class KVCacheFullError(ServiceError):
    """The KV pool has no free block for a write that was not reserved beforehand."""


class KVCache:
    """Paged keys and values for ``num_layers`` layers and up to ``num_slots`` requests.

    ``max_len`` bounds the positions of one request; ``num_blocks`` (default:
    every slot at ``max_len``) sizes the pool, one block of which is the null block.
    """

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
        block_size: int = 16,
        num_blocks: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.blocks_per_slot = -(-max_len // block_size)
        if num_blocks is None:
            num_blocks = num_slots * self.blocks_per_slot + 1
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots = num_slots
        self.num_blocks = num_blocks
        self.max_len = max_len
        #: Tokens already stored per slot (the next write position).
        self.lengths = [0] * num_slots
        #: Block ids per slot, on the host; ``table(slots, device)`` gives the device copy.
        self.tables: list[list[int]] = [[] for _ in range(num_slots)]
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._free_blocks = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        #: Prefix-cache accounting: prompt tokens looked up, and how many were found cached.
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- accounting
    @property
    def slots_used(self) -> int:
        return self.num_slots - len(self._free_slots)

    @property
    def slots_free(self) -> int:
        return len(self._free_slots)

    @property
    def usable_blocks(self) -> int:
        """Blocks a request can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def blocks_free(self) -> int:
        """Blocks that can be handed out now: never used, or cached but held by nobody."""
        return len(self._free_blocks) + len(self._idle)

    @property
    def blocks_used(self) -> int:
        return self.usable_blocks - self.blocks_free

    @property
    def blocks_cached(self) -> int:
        """Blocks named in the prefix cache (held or idle)."""
        return len(self._by_hash)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    # ---- slot life cycle
    def allocate(self) -> int | None:
        """Take a free slot (empty, holding no block), or None when all are in use."""
        if not self._free_slots:
            return None
        slot = self._free_slots.pop()
        self.lengths[slot] = 0
        self.tables[slot] = []
        return slot

    def free(self, slot: int) -> None:
        """Give the slot and its blocks back (cached blocks stay cached until reused)."""
        if slot in self._free_slots:
            return
        for block in self.tables[slot]:
            self._unref(block)
        self.tables[slot] = []
        self.lengths[slot] = 0
        self._free_slots.append(slot)

    def room(self, slot: int) -> int:
        """Positions this request may still add before reaching ``max_len``."""
        return self.max_len - self.lengths[slot]

    def blocks_needed(self, slot: int, upto: int, start: int | None = None) -> int:
        """New blocks that :meth:`reserve` would take to make ``[start, upto)`` writable
        (``start`` defaults to the slot's length)."""
        table = self.tables[slot]
        want = -(-upto // self.block_size)
        first = (self.lengths[slot] if start is None else start) // self.block_size
        shared = sum(1 for b in table[first:want] if self._refs[b] > 1)
        return max(0, want - len(table)) + shared

    def reserve(self, slot: int, upto: int, start: int | None = None) -> bool:
        """Make positions ``[start, upto)`` of ``slot`` writable (``start`` defaults to its length):
        take blocks for them and copy any block in that range that another holder still reads.
        False (and no change) when the pool has too few free blocks."""
        if upto > self.max_len:
            raise ValueError(f"KV cache overflow: {upto} positions needed, a request holds {self.max_len}")
        if self.blocks_needed(slot, upto, start) > self.blocks_free:
            return False
        table = self.tables[slot]
        first = self.lengths[slot] if start is None else start
        start, end = first // self.block_size, -(-upto // self.block_size)
        for i in range(start, min(end, len(table))):
            block = table[i]
            if self._refs[block] > 1:  # copy on write
                fresh = self._take()
                self._copy_block(block, fresh)
                self._unref(block)
                table[i] = fresh
            elif block in self._hash_of:  # about to change: it no longer holds what its name says
                del self._by_hash[self._hash_of.pop(block)]
        while len(table) < end:
            table.append(self._take())
        return True

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Make ``dst`` start with the first ``length`` positions of ``src`` (shared-prefix branches).

        Full blocks are shared, not copied; the partly filled last block is shared
        too and copied only when one of them writes into it.
        """
        n = self.lengths[src] if length is None else length
        for block in self.tables[dst]:
            self._unref(block)
        shared = self.tables[src][: -(-n // self.block_size)]
        for block in shared:
            self._refs[block] += 1
        self.tables[dst] = list(shared)
        self.lengths[dst] = n

    # ---- prefix cache
    def match_prefix(self, slot: int, tokens: Sequence[int]) -> int:
        """Attach the longest cached run of full blocks that starts ``tokens`` to the empty ``slot``.

        Returns the number of tokens now in the slot (a multiple of the block
        size); the caller prefills only the rest.
        """
        if self.lengths[slot] or self.tables[slot]:
            raise ValueError("match_prefix needs an empty slot")
        found: list[int] = []
        for digest in self._block_hashes(tokens):
            block = self._by_hash.get(digest)
            if block is None:
                break
            found.append(block)
        for block in found:
            if self._refs[block] == 0:
                self._idle.pop(block, None)
            self._refs[block] += 1
        self.tables[slot] = found
        self.lengths[slot] = len(found) * self.block_size
        self.prefix_queried_tokens += len(tokens)
        self.prefix_hit_tokens += self.lengths[slot]
        return self.lengths[slot]

    def prefix_cost(self, tokens: Sequence[int]) -> tuple[int, int]:
        """What :meth:`match_prefix` would give for ``tokens``: (tokens matched, idle blocks it
        would take out of the free count)."""
        matched = idle = 0
        for digest in self._block_hashes(tokens):
            block = self._by_hash.get(digest)
            if block is None:
                break
            matched += self.block_size
            idle += self._refs[block] == 0
        return matched, idle

    def register_prefix(self, slot: int, tokens: Sequence[int]) -> None:
        """Name the full blocks of ``slot`` that hold ``tokens`` (already written) for later matches."""
        table = self.tables[slot]
        for i, digest in enumerate(self._block_hashes(tokens[: self.lengths[slot]])):
            block = table[i]
            if digest in self._by_hash or block in self._hash_of:
                continue
            self._by_hash[digest] = block
            self._hash_of[block] = digest

    def _block_hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """One digest per full block: each covers every token up to the block's end."""
        out = []
        running = hashlib.blake2b(digest_size=16)
        bs = self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            running.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens[start : start + bs]))
            out.append(running.copy().digest())
        return out

    # ---- block pool
    def _copy_block(self, src: int, dst: int) -> None:
        """Copy one block's keys and values in every layer (the only place the cache moves data:
        a tensor-parallel cache overrides it to have its workers repeat the copy)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def _take(self) -> int:
        if self._free_blocks:
            block = self._free_blocks.pop()
        elif self._idle:
            block, _ = self._idle.popitem(last=False)  # the least recently used cached block
            del self._by_hash[self._hash_of.pop(block)]
        else:
            raise KVCacheFullError("the KV cache has no free block; this write was not reserved")
        self._refs[block] = 1
        return block

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] > 0:
            return
        if block in self._hash_of:
            self._idle[block] = None  # kept warm for a later prefix match
        else:
            self._free_blocks.append(block)

    # ---- what attention reads
    def table(self, slots: Sequence[int], num_blocks: int, *, device: torch.device | str) -> torch.Tensor:
        """[len(slots), num_blocks] block ids (the null block past a slot's own), on ``device``."""
        rows = [(self.tables[s] + [NULL_BLOCK] * num_blocks)[:num_blocks] for s in slots]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def read(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of ``slot``'s keys and values in ``layer``, each [kv_heads, length, head_dim]."""
        n = self.lengths[slot]
        table = self.table([slot], -(-n // self.block_size), device=self.k.device)[0]
        heads, dim = self.k.shape[-2:]
        k = self.k[layer][table].reshape(-1, heads, dim)[:n].transpose(0, 1)
        v = self.v[layer][table].reshape(-1, heads, dim)[:n].transpose(0, 1)
        return k.contiguous(), v.contiguous()
