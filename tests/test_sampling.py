"""The batched sampler: exact filtering, per-request penalties, and rows independent of the batch."""

from __future__ import annotations

import pytest
import torch

from mstar.layers import sampling
from mstar.layers.sampling import SamplingParams, penalise_repeats_, sample_tokens


def _naive_cutoff(row: torch.Tensor, top_p: float) -> float:
    """The smallest probability the nucleus keeps, by a full sort and a Python loop (one row;
    the running mass is a Python float, i.e. float64, as in the sampler)."""
    if top_p >= 1.0:
        return 0.0
    desc = torch.sort(row, descending=True).values
    mass = 0.0
    for value in desc.tolist():
        mass += value
        if mass >= top_p:
            return value
    return float(desc[-1])


def _mixed_logits(rows: int, vocab: int) -> torch.Tensor:
    """Peaked rows (trained-model-like) and flat rows (random weights) in one batch."""
    torch.manual_seed(5)
    logits = torch.randn(rows, vocab) * 0.05
    logits[::2] = torch.randn(rows // 2 + rows % 2, vocab) * 6
    return logits


@pytest.mark.parametrize("bins", [3, 64, 4096])
def test_nucleus_cutoffs_equal_a_full_sort_for_peaked_and_flat_rows(monkeypatch: pytest.MonkeyPatch, bins: int) -> None:
    # Few bins leave many tokens in the bin that holds the cut-off; many bins leave a handful.
    monkeypatch.setattr(sampling, "CPU_BINS", bins)
    probs = torch.softmax(_mixed_logits(6, 3000), dim=-1)
    top_ps = [0.8, 0.8, 0.95, 1.0, 0.5, 0.3]
    probs[3, :100] = 0.0  # a top-k row: masked tokens have no mass
    probs[3] /= probs[3].sum()
    cut = sampling._nucleus_cutoffs(probs, top_ps)
    for i, tp in enumerate(top_ps):
        assert float(cut[i, 0]) == _naive_cutoff(probs[i], tp), i  # exactly the same token's value


def test_rows_sample_the_same_alone_and_in_any_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampling, "CPU_BINS", 64)  # wide bins: the cut-off's bin holds many tokens
    vocab = 500
    settings = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.6, top_p=0.9, repetition_penalty=1.3),
        SamplingParams(temperature=1.1, top_p=0.95, min_p=0.05),
        SamplingParams(temperature=1.0, top_k=100, top_p=0.99),
    ]
    seeds = [3, 4, 5, 6, 7, 8]
    batch_gens = [torch.Generator().manual_seed(s) for s in seeds]
    solo_gens = [torch.Generator().manual_seed(s) for s in seeds]
    histories = [torch.randint(0, vocab, (n,)) for n in (0, 5, 9, 30, 2, 12)]
    for step in range(25):
        logits = _mixed_logits(len(settings), vocab) + step * 0.01
        batched = sample_tokens(logits, settings, batch_gens, histories)
        for i, p in enumerate(settings):
            alone = sample_tokens(logits[i : i + 1], [p], [solo_gens[i]], [histories[i]])
            assert int(alone[0]) == int(batched[i]), (step, i)


def test_min_p_keeps_only_tokens_near_the_most_likely() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    draws = 2000
    gens = [torch.Generator().manual_seed(i) for i in range(draws)]
    picks = sample_tokens(logits.expand(draws, -1), [SamplingParams(1.0, min_p=0.15)] * draws, gens)
    freq = torch.bincount(picks, minlength=5).float() / draws
    # 0.15 x 0.5 = 0.075: tokens 3 and 4 are dropped, the rest renormalised (0.5, 0.3, 0.1) / 0.9.
    assert set(picks.tolist()) == {0, 1, 2}
    torch.testing.assert_close(freq[:3], torch.tensor([0.5, 0.3, 0.1]) / 0.9, atol=0.035, rtol=0)


def test_repetition_penalty_touches_only_each_rows_seen_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    histories = [torch.tensor([1, 4, 4, 7]), None, torch.tensor([0, 49])]
    penalties = [1.3, 2.0, 0.5]
    out = logits.clone()
    penalise_repeats_(out, histories, penalties)
    want = logits.clone()
    for row, (hist, pen) in enumerate(zip(histories, penalties, strict=True)):
        for tok in set() if hist is None else set(hist.tolist()):
            v = logits[row, tok]
            want[row, tok] = v / pen if v > 0 else v * pen
    assert torch.equal(out, want)


def test_sampling_leaves_the_callers_logits_untouched() -> None:
    logits = torch.randn(2, 40)
    before = logits.clone()
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    sample_tokens(logits, [SamplingParams(0.8, 0.9, repetition_penalty=1.5)] * 2, gens, [torch.tensor([3, 5])] * 2)
    assert torch.equal(logits, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (checks the sampler stays on the device)")
def test_cuda_sampling_matches_the_cpu_filtering() -> None:
    torch.manual_seed(3)
    logits = torch.randn(8, 157_000, device="cuda") * 3
    params = [SamplingParams(0.6, 0.8, repetition_penalty=1.3)] * 8
    gens = [torch.Generator(device="cuda").manual_seed(i) for i in range(8)]
    picks = sample_tokens(logits, params, gens, [torch.tensor([1, 2, 3], device="cuda")] * 8)
    assert picks.device.type == "cuda" and picks.shape == (8,)
    cut_gpu = sampling._nucleus_cutoffs(torch.softmax(logits / 0.6, -1), [0.8] * 8)
    cut_cpu = sampling._nucleus_cutoffs(torch.softmax(logits.cpu() / 0.6, -1), [0.8] * 8)
    torch.testing.assert_close(cut_gpu.cpu(), cut_cpu, rtol=1e-4, atol=0)


def _nucleus_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    probs = torch.softmax(logits / p.temperature, -1)
    desc, order = torch.sort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for value, idx in zip(desc.tolist(), order.tolist(), strict=True):
        if mass >= p.top_p:
            break
        keep[idx] = True
        mass += value
    keep &= probs >= p.min_p * probs.max()
    out = probs * keep
    return out / out.sum()


@pytest.mark.parametrize("max_draws", [0, 1, 4], ids=["explicit-nucleus", "one-draw", "four-draws"])
def test_cpu_draws_follow_the_nucleus_whether_accepted_or_rejected(monkeypatch: pytest.MonkeyPatch, max_draws: int) -> None:
    # 0 draws: every row takes the explicit nucleus; 1: most rows are accepted at once, the rest fall back.
    monkeypatch.setattr(sampling, "CPU_MAX_DRAWS", max_draws)
    torch.manual_seed(2)
    logits = torch.randn(10) * 1.5
    p = SamplingParams(0.9, top_p=0.7, min_p=0.02)
    draws = 2000
    gens = [torch.Generator().manual_seed(i) for i in range(draws)]
    picks = sample_tokens(logits.expand(draws, -1), [p] * draws, gens)
    expected = _nucleus_distribution(logits, p)
    assert set(picks.tolist()) <= set(expected.nonzero().flatten().tolist())
    freq = torch.bincount(picks, minlength=10).float() / draws
    torch.testing.assert_close(freq, expected, atol=0.035, rtol=0)
