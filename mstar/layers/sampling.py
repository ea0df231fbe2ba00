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
    probs = torch.softmax(scaled, dim=-1)
    top_ps = [p.top_p for p in params]
    if any(tp < 1.0 for tp in top_ps):
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first is always
        # kept). Only the cut-off probability is needed; tokens tied with it are all kept, which
        # makes the set independent of sort order.
        probs = probs.masked_fill(probs < _nucleus_cutoffs(probs, top_ps, ks), 0.0)
    # min-p after top-p (the order transformers applies them in); the top token survives both.
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=torch.float32)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)

    # One uniform per row from that row's own generator: batch-invariant by construction.
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(dev)
    cdf = torch.cumsum(probs, dim=-1)
    # Inverse CDF in vocabulary order; right=True never lands on a zero-probability token, except
    # when u * total rounds up to the total: then the last kept token is taken (no branch, no sync).
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).clamp_(max=vocab - 1)
    last_kept = vocab - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1, keepdim=True)
    sampled = torch.where(probs.gather(-1, sampled) > 0, sampled, last_kept).squeeze(-1)
    if any(greedy_rows):
        greedy = torch.tensor(greedy_rows, device=dev)
        sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return sampled


#: Candidates taken per row on the CPU before falling back to sorting the whole row: the nucleus
#: of a trained model's distribution nearly always lies among its most likely few thousand tokens.
CPU_CANDIDATES = 2048


def _nucleus_cutoffs(probs: torch.Tensor, top_ps: Sequence[float], ks: Sequence[int]) -> torch.Tensor:
    """[B, 1]: each row's smallest probability kept by top-p (0 keeps the whole row).

    The nucleus is a prefix of the row's values in descending order, so only that
    prefix is needed. On a GPU the rows are sorted whole (fast there, and no
    host sync). On the CPU the top ``CPU_CANDIDATES`` values of every row are
    taken with one partial selection, and only rows whose candidates do not
    reach their top_p mass are sorted whole; the values and their running sum
    are the same numbers as a full sort's prefix, so the cut-off is exact.
    """
    batch, vocab = probs.shape
    dev = probs.device
    top_p = torch.tensor(top_ps, device=dev, dtype=torch.float32)[:, None]
    if dev.type == "cpu":
        # Rows with top-k never need more candidates than k, whatever their mass.
        width = min(vocab, max(CPU_CANDIDATES, max((k for k in ks if k < vocab), default=0)))
        desc = torch.topk(probs, width, dim=-1).values
        cum = torch.cumsum(desc, dim=-1)
        short = (cum[:, -1:] < top_p).squeeze(-1) & (width < vocab)
        if bool(short.any()):  # mass spread thin (an untrained model): those rows are sorted whole
            rows = short.nonzero().squeeze(-1)
            full = _descending_values(probs[rows])
            return _cutoff(full, torch.cumsum(full, dim=-1), top_p, rows=rows, out=_cutoff(desc, cum, top_p))
        return _cutoff(desc, cum, top_p)
    desc = torch.sort(probs, dim=-1, descending=True).values
    return _cutoff(desc, torch.cumsum(desc, dim=-1), top_p)


def _cutoff(
    desc: torch.Tensor,
    cum: torch.Tensor,
    top_p: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The value at which each row's running mass first reaches its top_p; 0 where top_p >= 1.

    With ``rows`` and ``out``, ``desc`` and ``cum`` hold only those rows of the
    batch, and their cut-offs replace theirs in ``out``.
    """
    tp = top_p if rows is None else top_p[rows]
    last = torch.searchsorted(cum, tp.contiguous()).clamp_(max=desc.shape[-1] - 1)
    cut = torch.where(tp < 1.0, desc.gather(-1, last), torch.zeros_like(tp))
    if rows is None or out is None:
        return cut
    out = out.clone()
    out[rows] = cut
    return out


def _descending_values(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` [B, V] sorted in descending order (values only).

    On the CPU numpy's vectorised sort of the values is about ten times faster
    than ``torch.sort``, which also carries the indices along; over a 150k-token
    vocabulary that sort was most of a decode step.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32:
        import numpy as np

        return torch.from_numpy(-np.sort(-x.detach().numpy(), axis=-1))
    return torch.sort(x, dim=-1, descending=True).values
