"""Token sampling for a batch of requests, each with its own settings and generator.

Every row draws its random number from its own ``torch.Generator``, and the
filtering is row-wise, so a seeded request samples the same token whether it
runs alone or inside a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "apply_repetition_penalty", "sample_tokens"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on one row: divide positive logits of seen tokens, multiply negative ones."""
    out = logits.clone()
    _penalise_(out, history, penalty)
    return out


def _penalise_(row: torch.Tensor, history: torch.Tensor, penalty: float) -> None:
    """:func:`apply_repetition_penalty` in place on ``row``."""
    if penalty == 1.0 or history.numel() == 0:
        return
    seen = torch.unique(history)
    picked = row.index_select(-1, seen)
    row.index_copy_(-1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    histories: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]. Returns a LongTensor [B] on logits' device."""
    batch = logits.shape[0]
    logits = logits.float()
    if histories is not None and any(h is not None and p.repetition_penalty != 1.0 for h, p in zip(histories, params, strict=True)):
        logits = logits.clone()  # penalised in place, row by row: one copy, not one per row
        for i in range(batch):
            hist = histories[i]
            if hist is not None:
                _penalise_(logits[i], hist, params[i].repetition_penalty)

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
