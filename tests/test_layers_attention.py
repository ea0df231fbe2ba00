"""The shared cached attention gives the same result as plain causal attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mstar.layers.attention import AttnBatch, cached_attention
from mstar.layers.kv_cache import KVCache


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_mixed_prefill_and_decode_rows_match_full_causal_attention() -> None:
    torch.manual_seed(0)
    cache = KVCache(num_layers=1, num_slots=3, max_len=16, num_kv_heads=2, head_dim=8)
    lens = [5, 3, 7]
    seqs = [(torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)) for n in lens]
    slots = [cache.allocate() for _ in lens]
    # Prefill all but the last token of each request as one padded batch ...
    pre = [n - 1 for n in lens]
    t = max(pre)

    def pad(x: torch.Tensor, n: int) -> torch.Tensor:
        return F.pad(x[:, :, :n], (0, 0, 0, t - n))

    batch = AttnBatch.build(cache, slots, pre, device="cpu")
    q = torch.cat([pad(s[0], n) for s, n in zip(seqs, pre, strict=False)])
    k = torch.cat([pad(s[1], n) for s, n in zip(seqs, pre, strict=False)])
    v = torch.cat([pad(s[2], n) for s, n in zip(seqs, pre, strict=False)])
    out = cached_attention(q, k, v, cache, 0, batch)
    batch.commit(cache)
    for i, (s, n) in enumerate(zip(seqs, pre, strict=False)):
        ref = _reference(s[0][:, :, :n], s[1][:, :, :n], s[2][:, :, :n])
        torch.testing.assert_close(out[i : i + 1, :, :n], ref)
    # ... then decode the last token of each together.
    batch = AttnBatch.build(cache, slots, [1, 1, 1], device="cpu")
    q = torch.cat([s[0][:, :, -1:] for s in seqs])
    k = torch.cat([s[1][:, :, -1:] for s in seqs])
    v = torch.cat([s[2][:, :, -1:] for s in seqs])
    out = cached_attention(q, k, v, cache, 0, batch)
    batch.commit(cache)
    for i, s in enumerate(seqs):
        ref = _reference(*s)[:, :, -1:]
        torch.testing.assert_close(out[i : i + 1], ref)
    assert cache.lengths[: len(lens)] == lens


def test_cache_refuses_a_request_when_no_slot_is_free() -> None:
    cache = KVCache(num_layers=1, num_slots=1, max_len=4, num_kv_heads=1, head_dim=2)
    slot = cache.allocate()
    assert slot is not None and cache.allocate() is None
    cache.free(slot)
    assert cache.slots_used == 0 and cache.allocate() == slot
