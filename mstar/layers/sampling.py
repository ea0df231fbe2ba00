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
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.unique(history)
    picked = logits.index_select(-1, seen)
    logits = logits.clone()
    logits.index_copy_(-1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    histories: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]. Returns a LongTensor [B] on logits' device."""
    batch = logits.shape[0]
    logits = logits.float()
    if histories is not None:
        rows = []
        for i in range(batch):
            hist = histories[i]
            p = params[i].repetition_penalty
            rows.append(apply_repetition_penalty(logits[i], hist, p) if hist is not None else logits[i])
        logits = torch.stack(rows)

    greedy = torch.tensor([p.temperature <= 0 for p in params], device=logits.device)
    argmax = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return argmax

    temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=logits.device, dtype=torch.float32)
    scaled = logits / temps[:, None]
    sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True)
    vocab = scaled.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]

    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
    masked = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=torch.float32)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)

    # One uniform per row from that row's own generator: batch-invariant by construction.
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(logits.device)
    cdf = torch.cumsum(probs, dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous()).clamp_(max=vocab - 1)
    sampled = sorted_idx.gather(-1, pick).squeeze(-1)
    return torch.where(greedy, argmax, sampled)
