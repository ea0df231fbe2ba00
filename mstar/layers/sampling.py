"""Token sampling for a batch of requests, each with its own settings and generator.

Every row draws its random number from its own ``torch.Generator``, and the
filtering is row-wise, so a seeded request samples the same token whether it
runs alone or inside a batch.
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
    """
    batch = logits.shape[0]
    logits = logits.float()
    if histories is not None and any(h is not None and p.repetition_penalty != 1.0 for h, p in zip(histories, params, strict=True)):
        logits = logits.clone()  # the caller's logits stay untouched
        penalise_repeats_(logits, histories, [p.repetition_penalty for p in params])

    greedy_rows = [p.temperature <= 0 for p in params]
    if all(greedy_rows):
        return logits.argmax(dim=-1)

    temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=logits.device, dtype=torch.float32)
    scaled = logits / temps[:, None]
    vocab = scaled.shape[-1]
    # top-k: drop what lies below the row's k-th largest logit (a partial selection, not a full sort).
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(ks) < vocab:
        k_t = torch.tensor(ks, device=logits.device)[:, None]
        top = torch.topk(scaled, max(k for k in ks if k < vocab), dim=-1).values
        kth = top.gather(-1, (k_t.clamp(max=top.shape[-1]) - 1))
        kth = torch.where(k_t < vocab, kth, torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=torch.float32)
    if bool((top_p < 1.0).any()):
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first is always
        # kept). Only the cut-off probability is needed, so the values alone are sorted; tokens tied
        # with the cut-off are all kept, which makes the set independent of sort order.
        cutoff = torch.stack([_nucleus_cutoff(probs[i], float(top_p[i])) for i in range(batch)])[:, None]
        probs = probs.masked_fill(probs < cutoff, 0.0)

    # One uniform per row from that row's own generator: batch-invariant by construction.
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(logits.device)
    cdf = torch.cumsum(probs, dim=-1)
    # Inverse CDF in vocabulary order; right=True never lands on a zero-probability token.
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).clamp_(max=vocab - 1)
    if not bool((probs.gather(-1, sampled) > 0).all()):  # u * total rounded up to total: take the last kept token
        last = vocab - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1, keepdim=True)
        sampled = torch.where(probs.gather(-1, sampled) > 0, sampled, last)
    sampled = sampled.squeeze(-1)
    if any(greedy_rows):
        greedy = torch.tensor(greedy_rows, device=logits.device)
        sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return sampled


# Tokens below this probability are left out of the nucleus search when the tokens above it
# already hold the top_p mass: the nucleus is a prefix of the descending order, so it lies among
# them and the cut-off is the same, but a few thousand values sort far faster than a vocabulary.
_CANDIDATE_MIN_PROB = 1e-6


def _nucleus_cutoff(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest probability kept by top-p on ``row`` [V] (0 keeps everything)."""
    if top_p >= 1.0:
        return row.new_zeros(())
    candidates = row[row >= _CANDIDATE_MIN_PROB]
    if float(candidates.sum()) < top_p:  # mass spread thin: search the whole row
        candidates = row
    desc = _descending_values(candidates[None])[0]
    # The kept prefix ends at the first token whose cumulative mass reaches top_p.
    last = torch.searchsorted(torch.cumsum(desc, dim=-1), torch.tensor([top_p])).clamp_(max=desc.numel() - 1)
    return desc[last[0]]


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
