"""The paged KV cache: blocks follow the tokens, sharing is copy-on-write, prefixes are reused,
and attention over scattered blocks equals attention over the same keys laid out contiguously."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mstar.layers.attention import AttnBatch, cached_attention
from mstar.layers.kv_cache import KVCache, KVCacheFullError


def _cache(num_blocks: int | None = None, *, slots: int = 4, max_len: int = 64, block: int = 4) -> KVCache:
    return KVCache(
        num_layers=1, num_slots=slots, max_len=max_len, num_kv_heads=2, head_dim=8, block_size=block, num_blocks=num_blocks
    )


def _write(cache: KVCache, slot: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append n random tokens' keys/values to ``slot``; return them as [1, Hkv, n, D]."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    batch = AttnBatch.build(cache, [slot], [n], device="cpu")
    cached_attention(torch.randn(1, 2, n, 8, generator=g), k, v, cache, 0, batch)
    batch.commit(cache)
    return k, v


def _read(cache: KVCache, slot: int) -> torch.Tensor:
    return cache.read(0, slot)[0]


def test_blocks_follow_the_tokens_a_request_holds() -> None:
    cache = _cache()
    slot = cache.allocate()
    assert slot is not None and cache.blocks_used == 0  # a slot alone holds no memory
    _write(cache, slot, 9, 0)
    assert cache.blocks_used == 3  # 9 positions in blocks of 4
    _write(cache, slot, 3, 1)
    assert cache.blocks_used == 3 and cache.lengths[slot] == 12
    cache.free(slot)
    assert cache.blocks_used == 0 and cache.blocks_free == cache.usable_blocks


def test_a_pool_too_small_refuses_the_write_instead_of_overwriting() -> None:
    cache = _cache(num_blocks=3)  # two usable blocks: 8 positions
    a, b = cache.allocate(), cache.allocate()
    assert a is not None and b is not None
    _write(cache, a, 8, 0)
    assert not cache.reserve(b, 1) and cache.blocks_free == 0
    with pytest.raises(KVCacheFullError):
        AttnBatch.build(cache, [b], [1], device="cpu")


def test_copied_slots_share_blocks_until_one_writes() -> None:
    cache = _cache()
    src, dst = cache.allocate(), cache.allocate()
    assert src is not None and dst is not None
    _write(cache, src, 6, 0)  # one full block, one half-filled
    before = _read(cache, src).clone()
    cache.copy_slot(src, dst)
    assert cache.blocks_used == 2  # shared, not copied
    _write(cache, dst, 3, 1)  # writes into the shared half block: dst gets its own copy
    assert cache.blocks_used == 4  # the copied half block, and a new one for the 9th position
    assert torch.equal(_read(cache, src), before)
    assert torch.equal(_read(cache, dst)[:, :6], before)
    cache.free(src)
    assert torch.equal(_read(cache, dst)[:, :6], before)


def test_prefix_blocks_are_matched_by_content_and_kept_warm_after_free() -> None:
    cache = _cache()
    tokens = list(range(100, 111))  # 11 tokens: two full blocks of 4
    a = cache.allocate()
    assert a is not None
    _write(cache, a, len(tokens), 0)
    cache.register_prefix(a, tokens)
    first = _read(cache, a)[:, :8].clone()
    cache.free(a)
    assert cache.blocks_used == 0 and cache.blocks_cached == 2  # idle, but still named
    b = cache.allocate()
    assert b is not None
    assert cache.prefix_cost(tokens) == (8, 2)
    assert cache.match_prefix(b, tokens) == 8
    assert torch.equal(_read(cache, b), first)
    assert cache.prefix_hit_tokens == 8 and cache.prefix_queried_tokens == 11
    c = cache.allocate()
    assert c is not None
    changed = [*tokens[:5], 0, *tokens[6:]]  # differs inside the second block
    assert cache.match_prefix(c, changed) == 4


def test_idle_cached_blocks_are_reused_oldest_first_when_the_pool_runs_out() -> None:
    cache = _cache(num_blocks=5)  # 4 usable blocks
    for seed, base in ((0, 0), (1, 50)):
        s = cache.allocate()
        assert s is not None
        _write(cache, s, 8, seed)
        cache.register_prefix(s, list(range(base, base + 8)))
        cache.free(s)
    assert cache.blocks_free == 4 and cache.blocks_cached == 4
    s = cache.allocate()
    assert s is not None
    _write(cache, s, 8, 2)  # takes the two oldest idle blocks (the first prompt's)
    probe = cache.allocate()
    assert probe is not None
    assert cache.prefix_cost(list(range(0, 8))) == (0, 0)
    assert cache.prefix_cost(list(range(50, 58))) == (8, 2)


@pytest.mark.parametrize("per_row", [True, False], ids=["cpu-per-row", "batched"])
def test_attention_over_scattered_blocks_equals_attention_over_contiguous_keys(per_row: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from mstar.layers import attention

    monkeypatch.setattr(attention, "PER_ROW_ON_CPU", per_row)
    torch.manual_seed(0)
    cache = _cache(num_blocks=40, slots=3, max_len=40)
    random.seed(0)
    random.shuffle(cache._free_blocks)  # rows' blocks end up scattered through the pool
    lens = [13, 5, 21]
    slots = [cache.allocate() for _ in lens]
    ks = [torch.randn(1, 2, n, 8) for n in lens]
    vs = [torch.randn(1, 2, n, 8) for n in lens]
    for slot, k, v, n in zip(slots, ks, vs, lens, strict=True):  # prefill each alone
        batch = AttnBatch.build(cache, [slot], [n - 1], device="cpu")
        cached_attention(torch.randn(1, 4, n - 1, 8), k[:, :, :-1], v[:, :, :-1], cache, 0, batch)
        batch.commit(cache)
    q = torch.randn(3, 4, 1, 8)
    batch = AttnBatch.build(cache, slots, [1, 1, 1], device="cpu")
    out = cached_attention(q, torch.cat([k[:, :, -1:] for k in ks]), torch.cat([v[:, :, -1:] for v in vs]), cache, 0, batch)
    for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
        ref = F.scaled_dot_product_attention(q[i : i + 1], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
        if per_row:
            assert torch.equal(out[i : i + 1], ref)  # bitwise: the same keys, the same kernel call
        else:
            torch.testing.assert_close(out[i : i + 1], ref)
