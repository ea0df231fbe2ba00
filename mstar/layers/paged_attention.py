"""Paged-attention decode in Triton: one new query token per row, read from the KV pool in place.

:func:`paged_decode_attention` attends each row's single query (already
written into the pool) to that row's context through its block table. It
replaces what :func:`mstar.layers.attention.cached_attention` does on the GPU
for decode steps (gather every row's blocks into a padded copy, repeat K/V for
grouped-query attention, SDPA with a mask) with a kernel that

* reads ``k_pool``/``v_pool`` ``[num_blocks, block_size, kv_heads, head_dim]``
  (the :class:`~mstar.layers.kv_cache.KVCache` layout) where they are, one
  block-table lookup per key position: no gather, no padded copy;
* is GQA native: a program owns one (row, kv head) and all ``groups`` query
  heads that share it, so each K/V byte is read from memory once per step
  (one program per query head would read every kv head ``groups`` times and
  rely on L2 to absorb it). Decode is bound by that read, not by arithmetic;
* keeps an online softmax (running max, running sum, rescaled accumulator)
  in fp32 whatever the cache dtype, as SDPA's fused kernels do;
* takes each row's context length from an int32 device tensor, so the launch
  grid depends only on the batch size, the head counts and ``num_splits``,
  never on the context: the call can be captured in a CUDA graph and replayed
  as the contexts grow (with the block table and lengths updated in place);
* optionally splits each row's context into ``num_splits`` ranges handled by
  separate programs (flash-decoding) whose partial results a second small
  kernel merges, which keeps the GPU busy at small batch and long context.

``block_size`` and ``head_dim`` are compile-time constants (powers of two; the
cache uses block sizes 16/32 and head dims 64/128).

Triton is an optional dependency (``pip install 'mstar[gpu]'``); without it
this module still imports, :data:`HAS_TRITON` is False and the function raises.
The kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how the tests
check them without a GPU. Mature paged kernels (FlashAttention's
``flash_attn_with_kvcache``, FlashInfer's decode wrappers) read the same
layout and could replace this one; they are not wired here.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "default_num_splits", "paged_decode_attention", "supports"]

HAS_TRITON = triton is not None
log = logging.getLogger("mstar.paged_attention")

#: Upper bound on the number of context splits :func:`default_num_splits` picks.
MAX_SPLITS = 16
#: fp32 elements of the [groups, tile, head_dim] product one program holds per step (sizes ``tile``).
_TILE_BUDGET = 8192

_LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _attend_tile(
        q,
        k_ptr,
        v_ptr,
        table_row,
        table_cols,
        start,
        hi,
        kv_head,
        m_i,
        l_i,
        acc,
        stride_kn,
        stride_kp,
        stride_kh,
        stride_vn,
        stride_vp,
        stride_vh,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """Fold key positions [start, min(start + TILE, hi)) into the online softmax (m_i, l_i, acc)."""
        d = tl.arange(0, HEAD_DIM)
        pos = start + tl.arange(0, TILE)
        ok = (pos < hi) & (pos // BLOCK_SIZE < table_cols)
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k_off = block * stride_kn + slot * stride_kp + kv_head * stride_kh
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, TILE], base-2 logits
        scores = tl.where(ok[None, :], scores, float("-inf"))
        # Every tile holds at least one valid position, so m_new is finite and exp2 never sees inf - inf.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = block * stride_vn + slot * stride_vp + kv_head * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [G, D]
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=["table_cols", "stride_tb"])
    def _paged_decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        len_ptr,
        out_ptr,
        m_ptr,
        l_ptr,
        qk_scale,  # softmax scale * log2(e): scores are kept in base 2
        table_cols,
        stride_qb,
        stride_qh,
        stride_kn,
        stride_kp,
        stride_kh,
        stride_vn,
        stride_vp,
        stride_vh,
        stride_tb,
        stride_ob,
        stride_oh,
        stride_os,
        stride_mb,
        stride_mh,
        GROUPS: tl.constexpr,
        GROUPS_P2: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        """One (row, kv head, split): its GROUPS query heads against its share of the row's context.

        With NUM_SPLITS == 1 the normalised result goes to out [B, Hq, D]; otherwise the
        unnormalised accumulator goes to out [B, Hq, S, D] and the running max / sum
        (base 2) to m, l [B, Hq, S], for _merge_splits_kernel.
        """
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        g = tl.arange(0, GROUPS_P2)
        d = tl.arange(0, HEAD_DIM)
        head_ok = g < GROUPS
        q_head = kv_head * GROUPS + g

        q = tl.load(
            q_ptr + row * stride_qb + q_head[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0
        )
        q = q.to(tl.float32) * qk_scale  # [G, D]

        length = tl.load(len_ptr + row)
        tiles = tl.cdiv(length, TILE)
        per_split = tl.cdiv(tiles, NUM_SPLITS)
        lo = split * per_split * TILE
        hi = tl.minimum(lo + per_split * TILE, length)

        m_i = tl.full([GROUPS_P2], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUPS_P2], tl.float32)
        acc = tl.zeros([GROUPS_P2, HEAD_DIM], tl.float32)
        table_row = table_ptr + row * stride_tb
        if INTERPRETED:
            # Triton 3.6's interpreter cannot run a for loop with a run-time bound under numpy >= 2.4
            # (it calls int() on a 1-element array); a while loop runs the same steps.
            start = lo
            while start < hi:
                m_i, l_i, acc = _attend_tile(
                    q,
                    k_ptr,
                    v_ptr,
                    table_row,
                    table_cols,
                    start,
                    hi,
                    kv_head,
                    m_i,
                    l_i,
                    acc,
                    stride_kn,
                    stride_kp,
                    stride_kh,
                    stride_vn,
                    stride_vp,
                    stride_vh,
                    HEAD_DIM,
                    BLOCK_SIZE,
                    TILE,
                )
                start += TILE
        else:
            for start in range(lo, hi, TILE):  # a for loop, so the compiler can pipeline the loads
                m_i, l_i, acc = _attend_tile(
                    q,
                    k_ptr,
                    v_ptr,
                    table_row,
                    table_cols,
                    start,
                    hi,
                    kv_head,
                    m_i,
                    l_i,
                    acc,
                    stride_kn,
                    stride_kp,
                    stride_kh,
                    stride_vn,
                    stride_vp,
                    stride_vh,
                    HEAD_DIM,
                    BLOCK_SIZE,
                    TILE,
                )

        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty row (length 0) gives zeros, not NaN
            o_ptrs = out_ptr + row * stride_ob + q_head[:, None] * stride_oh + d[None, :]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
        else:
            o_ptrs = out_ptr + row * stride_ob + q_head[:, None] * stride_oh + split * stride_os + d[None, :]
            tl.store(o_ptrs, acc, mask=head_ok[:, None])
            ml_off = row * stride_mb + q_head * stride_mh + split
            tl.store(m_ptr + ml_off, m_i, mask=head_ok)
            tl.store(l_ptr + ml_off, l_i, mask=head_ok)

    @triton.jit
    def _merge_splits_kernel(
        acc_ptr,
        m_ptr,
        l_ptr,
        out_ptr,
        stride_ab,
        stride_ah,
        stride_as,
        stride_mb,
        stride_mh,
        stride_ob,
        stride_oh,
        NUM_SPLITS: tl.constexpr,
        SPLITS_P2: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """One (row, query head): combine the splits' partial softmaxes into the output."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, SPLITS_P2)
        d = tl.arange(0, HEAD_DIM)
        s_ok = s < NUM_SPLITS
        ml_off = row * stride_mb + head * stride_mh + s
        m = tl.load(m_ptr + ml_off, mask=s_ok, other=float("-inf"))
        sums = tl.load(l_ptr + ml_off, mask=s_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights 0, output 0
        w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
        acc = tl.load(
            acc_ptr + row * stride_ab + head * stride_ah + s[:, None] * stride_as + d[None, :],
            mask=s_ok[:, None],
            other=0.0,
        )
        total = tl.sum(w * sums, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + row * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


_warned: set[str] = set()


def supports(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether the kernel can attend ``q`` [B, Hq, T, D] over ``pool`` [blocks, block_size, Hkv, D].

    A CUDA decode that cannot use it is logged once (by reason), never silently slower.
    """
    head_dim, block_size = q.shape[-1], pool.shape[1]
    reason = None
    if not HAS_TRITON:
        reason = "triton is not installed (pip install 'mstar[gpu]')"
    elif not (head_dim >= 16 and _is_pow2(head_dim) and _is_pow2(block_size)):
        reason = f"head_dim {head_dim} / block_size {block_size} are not powers of two (head_dim >= 16)"
    if reason is None:
        return True
    if reason not in _warned:
        _warned.add(reason)
        log.warning("paged decode attention falls back to gathering the cache and SDPA: %s", reason)
    return False


def default_num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Context splits that fill the GPU: 1 once ``batch * kv_heads`` programs cover its SMs twice.

    Depends only on the launch shape (never on the context), so a captured graph keeps it.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * kv_heads
    if programs >= 2 * sms:
        return 1
    return max(1, min(MAX_SPLITS, -(-2 * sms // programs)))


def _default_tile(groups_p2: int, head_dim: int) -> int:
    """Key positions per loop step: keep the [groups, tile, head_dim] fp32 product near _TILE_BUDGET."""
    return max(8, min(128, _TILE_BUDGET // (groups_p2 * head_dim)))


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache, read in place.

    ``q`` [B, Hq, D]: each row's one new query (its key and value already in the pool);
    ``k_pool``/``v_pool`` [num_blocks, block_size, Hkv, D] with Hq a multiple of Hkv;
    ``block_table`` [B, nb] integer block ids per row (entries past a row's blocks are
    never read); ``lengths`` [B] int32: each row's context length, the new token included.
    ``scale`` defaults to 1/sqrt(D). ``num_splits`` splits each row's context over that many
    programs (default: :func:`default_num_splits`); ``tile`` is the key positions per loop
    step (a power of two; default by the group and head sizes). Returns [B, Hq, D] in q's dtype.
    """
    if not HAS_TRITON:
        raise ImportError("paged_decode_attention needs Triton: pip install 'mstar[gpu]'")
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"expected q [B, Hq, D] and pools [blocks, block_size, Hkv, D], got {tuple(q.shape)}, "
            f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}"
        )
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, pool_dim = k_pool.shape
    if pool_dim != head_dim or q_heads % kv_heads:
        raise ValueError(f"q has {q_heads} heads of {head_dim}; the pool {kv_heads} heads of {pool_dim}")
    if not (_is_pow2(head_dim) and head_dim >= 16 and _is_pow2(block_size)):
        raise ValueError(f"head_dim ({head_dim}, >= 16) and block_size ({block_size}) must be powers of two")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype.is_floating_point:
        raise ValueError(
            f"block_table must be [B={batch}, nb] integers, got {tuple(block_table.shape)} {block_table.dtype}"
        )
    if lengths.shape != (batch,) or lengths.dtype != torch.int32:
        raise ValueError(f"lengths must be [B={batch}] int32, got {tuple(lengths.shape)} {lengths.dtype}")
    devices = {t.device for t in (q, k_pool, v_pool, block_table, lengths)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError("paged_decode_attention runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("the pools' head_dim must be contiguous (stride 1)")

    groups = q_heads // kv_heads
    groups_p2 = _next_pow2(groups)
    if tile is None:
        tile = _default_tile(groups_p2, head_dim)
    if not _is_pow2(tile):
        raise ValueError(f"tile must be a power of two, got {tile}")
    splits = default_num_splits(batch, kv_heads, q.device) if num_splits is None else num_splits
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    out = torch.empty((batch, q_heads, head_dim), device=q.device, dtype=q.dtype)
    if batch == 0:
        return out
    if splits == 1:
        partial, maxes, sums = out, out, out  # maxes/sums unused: the kernel writes the output directly
        partial_strides = (out.stride(0), out.stride(1), 0)
        ml_strides = (0, 0)
    else:
        partial = torch.empty((batch, q_heads, splits, head_dim), device=q.device, dtype=torch.float32)
        maxes = torch.empty((batch, q_heads, splits), device=q.device, dtype=torch.float32)
        sums = torch.empty_like(maxes)
        partial_strides = (partial.stride(0), partial.stride(1), partial.stride(2))
        ml_strides = (maxes.stride(0), maxes.stride(1))

    with _on_device(q.device):
        _paged_decode_kernel[(batch, kv_heads, splits)](
            q,
            k_pool,
            v_pool,
            block_table,
            lengths,
            partial,
            maxes,
            sums,
            scale * _LOG2E,
            block_table.shape[1],
            q.stride(0),
            q.stride(1),
            k_pool.stride(0),
            k_pool.stride(1),
            k_pool.stride(2),
            v_pool.stride(0),
            v_pool.stride(1),
            v_pool.stride(2),
            block_table.stride(0),
            *partial_strides,
            *ml_strides,
            GROUPS=groups,
            GROUPS_P2=groups_p2,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            TILE=tile,
            NUM_SPLITS=splits,
            INTERPRETED=_interpreting(),
        )
        if splits > 1:
            _merge_splits_kernel[(batch, q_heads)](
                partial,
                maxes,
                sums,
                out,
                *partial_strides,
                *ml_strides,
                out.stride(0),
                out.stride(1),
                NUM_SPLITS=splits,
                SPLITS_P2=_next_pow2(splits),
                HEAD_DIM=head_dim,
            )
    return out


def _interpreting() -> bool:
    return bool(HAS_TRITON and triton.knobs.runtime.interpret)


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` current for the launch when it is a CUDA device (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
