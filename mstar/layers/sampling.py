"""Token sampling for a batch of requests, each with its own settings and generator.

Every row draws its random number from its own ``torch.Generator``, and the
filtering is row-wise, so a seeded request samples the same token whether it
runs alone or inside a batch. All rows are filtered in one pass on the logits'
device (temperature, top-k, min-p, top-p, repetition penalty), with no Python
loop over rows and no host synchronisation on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "penalise_repeats_", "sample_tokens"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    #: Drop tokens less likely than ``min_p`` times the row's most likely token (0 = off).
    min_p: float = 0.0


def penalise_repeats_(logits: torch.Tensor, histories: Sequence[torch.Tensor | None], penalties: Sequence[float]) -> None:
    """CTRL-style repetition penalty, in place on ``logits`` [B, V]: for each row's seen tokens,
    divide positive logits by the row's penalty and multiply negative ones.

    ``histories[i]`` lists row i's seen token ids (repeats allowed, they get the same value);
    only those entries are touched, never a B x V pass.
    """
    rows, toks = [], []
    for i, (hist, penalty) in enumerate(zip(histories, penalties, strict=True)):
        if hist is not None and hist.numel() and penalty != 1.0:
            toks.append(hist.to(logits.device, torch.long).reshape(-1))
            rows.append(torch.full((toks[-1].numel(),), i, dtype=torch.long, device=logits.device))
    if not toks:
        return
    row_idx, tok_idx = torch.cat(rows), torch.cat(toks)
    per_entry = torch.tensor(list(penalties), dtype=logits.dtype, device=logits.device)[row_idx]
    seen = logits[row_idx, tok_idx]
    logits[row_idx, tok_idx] = torch.where(seen > 0, seen / per_entry, seen * per_entry)


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    histories: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]. Returns a LongTensor [B] on logits' device.

    ``histories[i]`` (optional) are row i's seen tokens for its repetition penalty.
    All rows are filtered together on the logits' device; every decision that
    depends on the settings is made from the Python values in ``params``, so no
    step waits for the device (no host sync) except where noted for the CPU.
    """
    logits = logits.float()
    if histories is not None and any(h is not None and p.repetition_penalty != 1.0 for h, p in zip(histories, params, strict=True)):
        logits = logits.clone()  # the caller's logits stay untouched
        penalise_repeats_(logits, histories, [p.repetition_penalty for p in params])

    greedy_rows = [p.temperature <= 0 for p in params]
    if all(greedy_rows):
        return logits.argmax(dim=-1)
    dev = logits.device
    vocab = logits.shape[-1]

    temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=dev, dtype=torch.float32)
    scaled = logits / temps[:, None]
    # top-k: drop what lies below the row's k-th largest logit (a partial selection, not a full sort).
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(ks) < vocab:
        k_t = torch.tensor(ks, device=dev)[:, None]
        top = torch.topk(scaled, max(k for k in ks if k < vocab), dim=-1).values
        kth = top.gather(-1, (k_t.clamp(max=top.shape[-1]) - 1))
        kth = torch.where(k_t < vocab, kth, torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    top_ps, min_ps = [p.top_p for p in params], [p.min_p for p in params]
    if dev.type == "cpu":
        sampled = _draw_by_rejection(scaled, top_ps, min_ps, generators)
    else:
        sampled = _draw_from_nucleus(torch.softmax(scaled, dim=-1), top_ps, min_ps, generators)
    if any(greedy_rows):
        greedy = torch.tensor(greedy_rows, device=dev)
        sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return sampled


def _draw_from_nucleus(
    probs: torch.Tensor, top_ps: Sequence[float], min_ps: Sequence[float], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Mask each row to its top-p nucleus and min-p floor, then draw one token (no host sync)."""
    dev, vocab = probs.device, probs.shape[-1]
    if any(tp < 1.0 for tp in top_ps):
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first is always
        # kept). Only the cut-off probability is needed; tokens tied with it are all kept, which
        # makes the set independent of sort order.
        probs = probs.masked_fill(probs < _nucleus_cutoffs(probs, top_ps), 0.0)
    # min-p after top-p (the order transformers applies them in); the top token survives both.
    if any(mp > 0.0 for mp in min_ps):
        min_p = torch.tensor(list(min_ps), device=dev, dtype=torch.float32)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    # One uniform per row from that row's own generator: batch-invariant by construction.
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(dev)
    cdf = torch.cumsum(probs, dim=-1)
    # Inverse CDF in vocabulary order; right=True never lands on a zero-probability token, except
    # when u * total rounds up to the total: then the last kept token is taken (no branch, no sync).
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).clamp_(max=vocab - 1)
    last_kept = vocab - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1, keepdim=True)
    return torch.where(probs.gather(-1, sampled) > 0, sampled, last_kept).squeeze(-1)


#: Draws per row before the CPU sampler falls back to finding the nucleus explicitly. A draw is
#: accepted with probability at least top_p, so four draws at top_p 0.8 leave 0.16% of rows.
CPU_MAX_DRAWS = 4


def _draw_by_rejection(
    scaled: torch.Tensor, top_ps: Sequence[float], min_ps: Sequence[float], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Exact top-p / min-p sampling on the CPU without finding the nucleus first.

    Every pass over a 150k-token row costs a fraction of a millisecond on a CPU, and
    finding the nucleus takes several. Instead a token is drawn from the row's whole
    (temperature, top-k) distribution and kept if it belongs to the nucleus: the mass
    of the tokens strictly more likely than it is below top_p (one pass), and it is at
    least min_p times as likely as the most likely token. Accepted draws follow the
    renormalised nucleus exactly; rejected rows draw again from their own generator,
    so a row's tokens depend on that row alone.
    """
    weights = torch.exp(scaled - scaled.amax(dim=-1, keepdim=True))  # the most likely token weighs 1
    cdf = torch.cumsum(weights, dim=-1)
    vocab = weights.shape[-1]
    filtered = [tp < 1.0 or mp > 0.0 for tp, mp in zip(top_ps, min_ps, strict=True)]
    total = weights.sum(dim=-1, dtype=torch.float64) if any(filtered) else None
    out = torch.empty(weights.shape[0], dtype=torch.long)
    rows = list(range(weights.shape[0]))
    for _ in range(CPU_MAX_DRAWS):
        if not rows:
            return out
        every = len(rows) == weights.shape[0]
        idx = torch.tensor(rows)
        w, c = (weights, cdf) if every else (weights[idx], cdf[idx])
        u = torch.stack([torch.rand((), generator=generators[i]) for i in rows])
        tok = torch.searchsorted(c, (u * c[:, -1])[:, None].contiguous(), right=True).clamp_(max=vocab - 1)
        picked = w.gather(-1, tok)
        if bool((picked <= 0).any()):  # u * total rounded up to the total: take the last possible token
            last = vocab - 1 - (w.flip(-1) > 0).to(torch.int8).argmax(dim=-1, keepdim=True)
            tok = torch.where(picked > 0, tok, last)
            picked = w.gather(-1, tok)
        accept = torch.ones(len(rows), dtype=torch.bool)
        check = [k for k, i in enumerate(rows) if filtered[i]]
        if check and total is not None:
            sub = torch.tensor(check)
            wc, pc = (w, picked) if len(check) == len(rows) else (w[sub], picked[sub])
            above = torch.where(wc > pc, wc, 0.0).sum(dim=-1, dtype=torch.float64)
            top_p = torch.tensor([top_ps[rows[k]] for k in check], dtype=torch.float64)
            min_p = torch.tensor([min_ps[rows[k]] for k in check], dtype=torch.float32)
            within = (above < top_p * total[idx[sub]]) | (top_p >= 1.0)
            accept[sub] = within & (pc.squeeze(-1) >= min_p)
        out[idx[accept]] = tok[accept].squeeze(-1)
        rows = [i for k, i in enumerate(rows) if not accept[k]]
    if rows:  # unlucky rows: find their nucleus explicitly and draw once more
        idx = torch.tensor(rows)
        probs = weights[idx] / weights[idx].sum(dim=-1, keepdim=True)
        out[idx] = _draw_from_nucleus(
            probs, [top_ps[i] for i in rows], [min_ps[i] for i in rows], [generators[i] for i in rows]
        )
    return out


#: Bins of the CPU top-p search: each row's probabilities are binned on a log scale between its
#: smallest and largest, so the bin holding the cut-off has a few hundred tokens at most.
CPU_BINS = 4096


def _nucleus_cutoffs(probs: torch.Tensor, top_ps: Sequence[float]) -> torch.Tensor:
    """[B, 1]: each row's smallest probability kept by top-p (0 keeps the whole row).

    The nucleus is a prefix of the row's values in descending order, cut where
    the running mass (summed in float64) first reaches top_p. On a GPU the rows
    are sorted whole (fast there, and no host sync). On the CPU a full sort of a
    150k-token row costs milliseconds, so each row is binned instead: one pass
    adds up the mass per bin (bins ordered by probability), which names the bin
    where the mass crosses top_p, and only that bin's few tokens are sorted.
    """
    top_p = torch.tensor(top_ps, device=probs.device, dtype=torch.float64)[:, None]
    if probs.device.type == "cpu":
        return _cutoff_by_bins(probs, top_p)
    desc = torch.sort(probs, dim=-1, descending=True).values
    return _cutoff(desc, torch.cumsum(desc.double(), dim=-1), top_p)


def _cutoff_by_bins(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """:func:`_nucleus_cutoffs` for CPU rows, by a histogram of log-probabilities."""
    positive = probs > 0
    logp = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    hi = logp.amax(dim=-1, keepdim=True)
    lo = torch.where(positive, logp, hi).amin(dim=-1, keepdim=True)
    # Bin 0 holds the most likely tokens; zero-probability tokens (top-k) share the last bin.
    width = ((hi - lo) / (CPU_BINS - 1)).clamp_min(torch.finfo(probs.dtype).tiny)
    bins = ((hi - logp) / width).floor_().clamp_(0, CPU_BINS - 1).long()
    mass = torch.zeros(probs.shape[0], CPU_BINS, dtype=torch.float64).scatter_add_(1, bins, probs.double())
    cum = mass.cumsum(dim=-1)
    crossing = torch.searchsorted(cum, top_p).clamp_(max=CPU_BINS - 1)  # first bin reaching top_p
    above = torch.where(crossing > 0, cum.gather(-1, (crossing - 1).clamp_(min=0)), torch.zeros_like(top_p))
    in_bin = probs.masked_fill(bins != crossing, 0.0)
    width_needed = max(1, int((bins == crossing).sum(dim=-1).max()))
    desc = torch.topk(in_bin, width_needed, dim=-1).values  # the crossing bin's tokens, most likely first
    return _cutoff(desc, above + torch.cumsum(desc.double(), dim=-1), top_p)


def _cutoff(desc: torch.Tensor, cum: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The value at which each row's running mass ``cum`` first reaches its top_p; 0 where top_p >= 1."""
    last = torch.searchsorted(cum, top_p.contiguous()).clamp_(max=desc.shape[-1] - 1)
    return torch.where(top_p < 1.0, desc.gather(-1, last).double(), torch.zeros_like(top_p)).to(desc.dtype)
