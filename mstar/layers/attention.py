"""Batched attention over the paged KV cache, for prefill chunks and decode steps alike.

One forward pass may mix requests at different lengths: row ``b`` adds
``new_lens[b]`` tokens to slot ``slots[b]``, which already holds
``starts[b]`` tokens. :class:`AttnBatch` reserves the blocks those tokens go
to and computes the block tables, write addresses and mask once per forward;
:func:`cached_attention` uses them in every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mstar.layers import paged_attention as _paged
from mstar.layers.kv_cache import KVCache, KVCacheFullError

__all__ = ["AttnBatch", "cached_attention"]

#: On CPU, attend row by row so a request's result is bitwise independent of its batch (see _attend_rows).
PER_ROW_ON_CPU = True


@dataclass(slots=True)
class AttnBatch:
    """Where a batch's new tokens go in the cache, and what each may attend to."""

    slots: torch.Tensor  # [B] long
    table: torch.Tensor  # [B, ceil(kv_len / block_size)] long: each row's blocks (the null block past its own)
    starts: list[int]
    new_lens: list[int]
    positions: torch.Tensor  # [B, T] long: absolute positions (padding rows repeat the last one)
    valid: torch.Tensor  # [B, T] bool: False on padding
    mask: torch.Tensor | None  # [B, 1, T, K] bool (True = attend), None when no masking is needed
    kv_len: int
    write_rows: torch.Tensor  # [N] batch row of each valid new token
    write_cols: torch.Tensor  # [N] query column of each valid new token
    write_slots: torch.Tensor  # [N] cache slot of each valid new token
    write_pos: torch.Tensor  # [N] cache position of each valid new token
    write_block: torch.Tensor  # [N] pool block each valid new token is stored in
    write_offset: torch.Tensor  # [N] position inside that block
    context_lens: torch.Tensor  # [B] int32: each row's context after this forward (what a paged kernel reads)

    @classmethod
    def build(
        cls,
        cache: KVCache,
        slots: Sequence[int],
        new_lens: Sequence[int],
        *,
        device: torch.device | str,
        causal: bool = True,
        starts: Sequence[int] | None = None,
    ) -> AttnBatch:
        """Describe a forward where row b appends ``new_lens[b]`` tokens to ``slots[b]``.

        ``starts`` defaults to the slots' current lengths. With ``causal=False``
        the new tokens of a row see each other fully (bidirectional blocks,
        such as image latents being denoised).
        """
        starts = list(cache.lengths[s] for s in slots) if starts is None else list(starts)
        new_lens = list(new_lens)
        t = max(new_lens)
        kv_len = max(s + n for s, n in zip(starts, new_lens, strict=True))
        if kv_len > cache.max_len:
            raise ValueError(f"KV cache overflow: {kv_len} positions needed, slots hold {cache.max_len}")
        for slot, start, n in zip(slots, starts, new_lens, strict=True):
            if not cache.reserve(slot, start + n, start):
                raise KVCacheFullError(
                    f"the KV cache has {cache.blocks_free} free blocks; a forward needed more (reserve them before it)"
                )
        bs = cache.block_size
        table = cache.table(slots, -(-kv_len // bs), device=device)
        start_t = torch.tensor(starts, device=device)[:, None]
        cols = torch.arange(t, device=device)[None, :]
        lens_t = torch.tensor(new_lens, device=device)[:, None]
        valid = cols < lens_t
        positions = start_t + torch.minimum(cols, lens_t - 1)
        rows, qcols = valid.nonzero(as_tuple=True)
        slots_t = torch.tensor(list(slots), device=device, dtype=torch.long)
        keys = torch.arange(kv_len, device=device)[None, None, :]
        if causal:
            allowed = keys <= positions[:, :, None]
        else:
            allowed = keys < (start_t + lens_t)[:, :, None]
        # Every query row must see something, or softmax yields NaN on padding rows.
        need_mask = not (t == 1 and all(s + n == kv_len for s, n in zip(starts, new_lens, strict=True)))
        write_pos = positions[rows, qcols]
        return cls(
            slots=slots_t,
            table=table,
            starts=starts,
            new_lens=new_lens,
            positions=positions,
            valid=valid,
            mask=allowed[:, None, :, :] if need_mask else None,
            kv_len=kv_len,
            write_rows=rows,
            write_cols=qcols,
            write_slots=slots_t[rows],
            write_pos=write_pos,
            write_block=table[rows, write_pos // bs],
            write_offset=write_pos % bs,
            context_lens=torch.tensor(
                [s + n for s, n in zip(starts, new_lens, strict=True)], dtype=torch.int32, device=device
            ),
        )

    def commit(self, cache: KVCache) -> None:
        """Record the new tokens as part of their slots (skip to keep them transient)."""
        for slot, start, n in zip(self.slots.tolist(), self.starts, self.new_lens, strict=True):
            cache.lengths[slot] = max(cache.lengths[slot], start + n)


def cached_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: KVCache,
    layer: int,
    batch: AttnBatch,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Store ``k_new``/``v_new`` [B, Hkv, T, D] in the cache and attend ``q`` [B, Hq, T, D] to each row's context.

    ``mask`` overrides the batch's mask (shape [B, 1, T, kv_len], True = attend)
    for models with their own attention pattern (prefix-LM, block-causal).
    Returns [B, Hq, T, D].
    """
    kc, vc = cache.k[layer], cache.v[layer]  # [blocks, block_size, Hkv, D]
    r, c = batch.write_rows, batch.write_cols
    kc[batch.write_block, batch.write_offset] = k_new[r, :, c].to(kc.dtype)
    vc[batch.write_block, batch.write_offset] = v_new[r, :, c].to(vc.dtype)
    if use_paged_kernel(q, kc, mask):
        # Decode on the GPU: the kernel reads every row's blocks in place through its table, GQA
        # native; ``batch.mask`` for one new token only encodes each row's length, which
        # ``context_lens`` carries.
        return _paged.paged_decode_attention(q[:, :, 0], kc, vc, batch.table, batch.context_lens, scale)[:, :, None]
    if PER_ROW_ON_CPU and q.device.type == "cpu":
        return _attend_rows(q, kc, vc, batch, scale, mask)
    keys = _gather(kc, batch.table, batch.kv_len)
    values = _gather(vc, batch.table, batch.kv_len)
    attn_mask = mask if mask is not None else batch.mask
    groups = q.shape[1] // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=attn_mask, scale=scale)


def use_paged_kernel(q: torch.Tensor, pool: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether this attention call goes to the paged decode kernel: a CUDA decode step (one new
    token per row) with no model-specific mask, on shapes the kernel handles."""
    return q.is_cuda and q.shape[2] == 1 and mask is None and _paged.supports(q, pool)


def _attend_rows(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, batch: AttnBatch, scale: float | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention one row at a time, each over exactly its own tokens and context (CPU).

    CPU attention kernels block their sums by the padded shapes, so a row
    attended inside a batch (padded to the longest row and context) differs in
    the last bits from the same row run alone, and a sampled token can flip.
    Attending each row over its own lengths, with the mask it would have alone,
    makes a request's result bitwise independent of its neighbours. On CPU the
    per-row calls cost little next to the matmuls; GPUs keep the batched call.
    """
    out = torch.zeros_like(q)
    groups = q.shape[1] // kc.shape[2]
    bs = kc.shape[1]
    for b in range(q.shape[0]):
        n = batch.new_lens[b]
        ctx = batch.starts[b] + n
        blocks = batch.table[b : b + 1, : -(-ctx // bs)]
        keys = _gather(kc, blocks, ctx).to(q.dtype)
        values = _gather(vc, blocks, ctx).to(q.dtype)
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        # Alone, a one-token row has no mask (it sees its whole context); longer rows do.
        if mask is not None:
            row_mask: torch.Tensor | None = mask[b : b + 1, :, :n, :ctx]
        elif n > 1 and batch.mask is not None:
            row_mask = batch.mask[b : b + 1, :, :n, :ctx]
        else:
            row_mask = None
        out[b : b + 1, :, :n] = F.scaled_dot_product_attention(q[b : b + 1, :, :n], keys, values, attn_mask=row_mask, scale=scale)
    return out


def _gather(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of each row's blocks, as [B, Hkv, length, D] (a copy)."""
    b, nb = table.shape
    _, bs, heads, dim = pool.shape
    return pool[table].reshape(b, nb * bs, heads, dim)[:, :length].transpose(1, 2)
