"""The shared blocks are batch-invariant: a row's result does not depend on its neighbours.

Covers the sampler (per-request generators and settings) and a two-layer
decoder built on the slot KV cache and batched attention, decoded greedily
and with sampling, alone and in a batch whose members start at different
times and have different prompt lengths.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mstar.layers.attention import AttnBatch, cached_attention
from mstar.layers.invariant import BatchInvariantLinear
from mstar.layers.kv_cache import KVCache
from mstar.layers.rotary import RotaryEmbedding, apply_rotary
from mstar.layers.sampling import SamplingParams, sample_tokens

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 64, 32, 4, 2, 2
HEAD_DIM = DIM // HEADS


def test_sampler_rows_are_independent_of_their_batch() -> None:
    torch.manual_seed(0)
    settings = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.6, top_p=0.9, repetition_penalty=1.3),
    ]
    seeds = [3, 4, 5, 6]
    batch_gens = [torch.Generator().manual_seed(s) for s in seeds]
    solo_gens = [torch.Generator().manual_seed(s) for s in seeds]
    history = torch.randint(0, VOCAB, (10,))
    for _ in range(20):
        logits = torch.randn(len(settings), VOCAB) * 3
        batched = sample_tokens(logits, settings, batch_gens, [history] * len(settings))
        for i, p in enumerate(settings):
            alone = sample_tokens(logits[i : i + 1], [p], [solo_gens[i]], [history])
            assert int(alone[0]) == int(batched[i])


class _TinyDecoder(nn.Module):
    """A minimal Llama-shaped decoder on the shared cache/attention/rotary blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        # The projections the models use: with plain nn.Linear a row rounds differently alone and in a batch.
        self.qkv = nn.ModuleList(BatchInvariantLinear(DIM, (HEADS + 2 * KV_HEADS) * HEAD_DIM) for _ in range(LAYERS))
        self.out = nn.ModuleList(BatchInvariantLinear(DIM, DIM) for _ in range(LAYERS))
        self.head = BatchInvariantLinear(DIM, VOCAB)
        self.rope = RotaryEmbedding(HEAD_DIM, theta=10000.0)

    @torch.no_grad()
    def forward(self, tokens: list[list[int]], slots: list[int], cache: KVCache) -> torch.Tensor:
        """Append each row's tokens to its slot; return the last valid position's logits [B, V]."""
        lens = [len(t) for t in tokens]
        width = max(lens)
        ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens])
        batch = AttnBatch.build(cache, slots, lens, device="cpu")
        cos, sin = self.rope(batch.positions)
        x = self.embed(ids)
        bsz = len(tokens)
        for layer in range(LAYERS):
            q, k, v = self.qkv[layer](x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
            q = apply_rotary(q.view(bsz, width, HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
            k = apply_rotary(k.view(bsz, width, KV_HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
            v = v.view(bsz, width, KV_HEADS, HEAD_DIM).transpose(1, 2)
            att = cached_attention(q, k, v, cache, layer, batch)
            x = x + self.out[layer](att.transpose(1, 2).reshape(bsz, width, DIM))
        batch.commit(cache)
        last = torch.tensor(lens) - 1
        return self.head(x[torch.arange(bsz), last])


def _cache() -> KVCache:
    return KVCache(num_layers=LAYERS, num_slots=4, max_len=64, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)


def _decode(model: _TinyDecoder, prompts: dict[str, list[int]], starts: dict[str, int], params: dict[str, SamplingParams], n: int) -> dict[str, list[int]]:
    """Continuous batching in miniature: request r joins at step starts[r] (prefill), then decodes n tokens."""
    cache = _cache()
    gens = {r: torch.Generator().manual_seed(100 + ord(r[0])) for r in prompts}  # seeded per request
    out: dict[str, list[int]] = {r: [] for r in prompts}
    slot: dict[str, int] = {}
    step = 0
    while any(len(o) < n for o in out.values()):
        live = [r for r in prompts if starts[r] <= step and len(out[r]) < n]
        rows = []
        for r in live:
            if r not in slot:
                s = cache.allocate()
                assert s is not None
                slot[r] = s
                rows.append(prompts[r])
            else:
                rows.append([out[r][-1]])
        if live:
            logits = model(rows, [slot[r] for r in live], cache)
            picked = sample_tokens(logits, [params[r] for r in live], [gens[r] for r in live])
            for r, t in zip(live, picked.tolist(), strict=True):
                out[r].append(int(t))
                if len(out[r]) == n:
                    cache.free(slot[r])
        step += 1
    assert cache.slots_used == 0
    return out


def test_decoder_on_shared_blocks_is_batch_invariant_greedy_and_sampled() -> None:
    torch.manual_seed(0)
    model = _TinyDecoder().eval()
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [9, 8], "c": [5, 5, 5, 5]}
    params = {
        "a": SamplingParams(temperature=0.0),
        "b": SamplingParams(temperature=0.9, top_p=0.9),
        "c": SamplingParams(temperature=1.2, top_k=20),
    }
    together = _decode(model, prompts, {"a": 0, "b": 0, "c": 3}, params, 12)
    for r in prompts:
        alone = _decode(model, {r: prompts[r]}, {r: 0}, {r: params[r]}, 12)
        assert together[r] == alone[r], r


def _nucleus(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution sampling should follow, computed the slow, obvious way (one row)."""
    scaled = logits / p.temperature
    order = torch.argsort(scaled, descending=True)
    keep = torch.zeros_like(scaled, dtype=torch.bool)
    if p.top_k:
        keep[order[: p.top_k]] = True
    else:
        keep[:] = True
    probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), -1)
    mass = 0.0
    nucleus = torch.zeros_like(keep)
    for idx in order.tolist():
        if not keep[idx] or mass >= p.top_p:
            break
        nucleus[idx] = True
        mass += float(probs[idx])
    out = probs * nucleus
    return out / out.sum()


@pytest.mark.slow
def test_sampler_follows_the_top_k_top_p_distribution() -> None:
    torch.manual_seed(1)
    logits = torch.randn(12) * 2
    draws = 4000
    for p in (SamplingParams(0.7, 0.8), SamplingParams(1.0, 1.0, top_k=4), SamplingParams(1.3, 0.6, top_k=8)):
        gens = [torch.Generator().manual_seed(i) for i in range(draws)]
        picks = sample_tokens(logits.expand(draws, -1), [p] * draws, gens)
        freq = torch.bincount(picks, minlength=12).float() / draws
        expected = _nucleus(logits, p)
        assert set(picks.tolist()) == set(expected.nonzero().flatten().tolist()), p
        torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


# (in, out) widths of the models' projections: the tiny Orpheus Llama (TINY_LLAMA), SmolLM2-135M-like
# layers, and odd widths whose blocks do not start 64-byte aligned by themselves.
_LINEAR_SHAPES = (
    (64, 64), (64, 32), (64, 128), (128, 64),
    (576, 576), (576, 192), (576, 1536), (1536, 576),
    (100, 77), (5, 3),
)  # fmt: skip
# 1-3, 4-11 and 12+ rows take three different MKL kernels on an AMD EPYC; 33 and 64 span several blocks.
_ROW_COUNTS = (*range(1, 21), 33, 64)


def _check_rows_alone_equal_rows_in_batches(k: int, n: int, counts: tuple[int, ...], every_position: bool) -> None:
    from mstar.layers.invariant import invariant_linear

    gen = torch.Generator().manual_seed(k * 7919 + n)
    w = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(max(counts), k, generator=gen)
    alone = invariant_linear(x[:1], w)[0]  # no bias: adding one would round away last-bit differences
    for m in counts:
        # The row among other rows, at the start, middle and end; then (all rows the same) at every position.
        rows = x[:m].clone()
        spots = sorted({0, m // 2, m - 1})
        rows[spots] = x[0]
        out = invariant_linear(rows, w)
        for p in spots:
            assert torch.equal(out[p], alone), (k, n, m, p)
        if every_position:
            same = invariant_linear(x[:1].expand(m, k), w)
            for p in range(m):
                assert torch.equal(same[p], alone), (k, n, m, p, "all rows alike")


@pytest.mark.parametrize("rows_per_call", [None, 4], ids=["default", "four-row-blocks-everywhere"])
def test_invariant_linear_rows_do_not_depend_on_the_other_rows(
    rows_per_call: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mstar.layers import invariant

    if rows_per_call is None:
        for k, n in _LINEAR_SHAPES:
            _check_rows_alone_equal_rows_in_batches(k, n, _ROW_COUNTS, every_position=True)
        # The tiny Orpheus vocabulary head (two-row blocks by default): fewer row counts, it is slow.
        _check_rows_alone_equal_rows_in_batches(64, 156940, (1, 2, 3, 4, 5, 11, 12, 17), every_position=False)
    else:  # blocks on the layers too (fewer cases: small threaded calls stall when the cores are shared)
        monkeypatch.setattr(invariant, "ROWS_PER_CALL", rows_per_call)
        for k, n in ((64, 128), (576, 1536), (100, 77)):
            _check_rows_alone_equal_rows_in_batches(k, n, (*range(1, 14), 17, 33), every_position=True)


@pytest.mark.parametrize("rows_per_call", [1, 4], ids=["one-row-calls", "four-row-blocks"])
def test_invariant_linear_ignores_the_layout_and_alignment_of_its_input(
    rows_per_call: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One-row calls are the ones whose rounding depends on the row's address (measured with MKL: k=100).
    from mstar.layers import invariant
    from mstar.layers.invariant import invariant_linear

    monkeypatch.setattr(invariant, "ROWS_PER_CALL", rows_per_call)
    torch.manual_seed(3)
    for k, n in ((64, 128), (100, 77), (576, 192)):
        w, bias = torch.randn(n, k) * 0.02, torch.randn(n)
        x = torch.randn(6, k)
        alone = invariant_linear(x[:1], w)[0]
        for off in range(1, 16):  # the row at every 4-byte offset from a 64-byte boundary, alone and in a batch
            buf = torch.zeros(off + 6 * k)
            view = buf[off:].view(6, k)
            view.copy_(x)
            assert torch.equal(invariant_linear(view[:1], w)[0], alone), (k, n, off)
            assert torch.equal(invariant_linear(view[:5], w)[0], alone), (k, n, off)
        strided = x.T.contiguous().T  # same values, column-major
        assert torch.equal(invariant_linear(strided, w)[0], alone), (k, n)
        grid = torch.stack([x[:3], x[3:]])  # [2, 3, k]: the leading dims are flattened
        assert torch.equal(invariant_linear(grid, w)[0, 0], alone), (k, n)
        assert torch.equal(invariant_linear(grid, w, bias)[1, 2], invariant_linear(x[5:], w, bias)[0]), (k, n)
        torch.testing.assert_close(invariant_linear(grid, w, bias), torch.nn.functional.linear(grid, w, bias))
        lifted = x[:5, None]
        torch.testing.assert_close(invariant_linear(lifted, w, bias), torch.nn.functional.linear(lifted, w, bias))


def test_invariant_linear_falls_back_to_one_row_per_call_when_a_block_rounds_by_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A BLAS whose columns round differently by position inside a block is caught by the check and avoided."""
    from mstar.layers import invariant

    real_mm = torch.mm

    def skewed_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # column j rounds "differently": a tiny skew
        out = real_mm(a, b)
        return out * (1 + 1e-6 * torch.arange(out.shape[1], dtype=out.dtype))

    monkeypatch.setattr(invariant, "_checked_rows", {})
    monkeypatch.setattr(invariant, "ROWS_PER_CALL", 4)
    monkeypatch.setattr(torch, "mm", skewed_mm)
    torch.manual_seed(4)
    w, x = torch.randn(96, 64), torch.randn(9, 64)
    with pytest.warns(RuntimeWarning, match="one row per call"):
        alone = invariant.invariant_linear(x[:1], w)[0]
    assert set(invariant._checked_rows.values()) == {1}
    for m in (2, 4, 9):
        assert torch.equal(invariant.invariant_linear(x[:m], w)[0], alone), m
    monkeypatch.setattr(torch, "mm", real_mm)
    torch.testing.assert_close(invariant.invariant_linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("spread", [0.5, 3.0, 30.0])
def test_top_p_cutoff_from_candidates_equals_the_full_sort(spread: float) -> None:
    from mstar.layers.sampling import _nucleus_cutoffs

    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(50_000) * spread, dim=-1)  # from peaked to nearly flat
    for top_p in (0.1, 0.8, 0.95):
        desc = torch.sort(probs, descending=True).values
        # The running mass in float64, as the sampler adds it up.
        last = int(torch.searchsorted(torch.cumsum(desc.double(), 0), torch.tensor([top_p], dtype=torch.float64))[0])
        assert _nucleus_cutoffs(probs[None], [top_p])[0, 0] == desc[min(last, desc.numel() - 1)]
    assert _nucleus_cutoffs(probs[None], [1.0])[0, 0] == 0
