"""Mixture-of-Transformers routing: every token goes to one of two experts by a boolean mask.

BAGEL's decoder layers hold an understanding expert (text, ViT tokens) and a
generation expert (VAE latent tokens) with the same shapes; attention is
shared across all tokens, but every projection, norm and MLP is chosen per
token. :class:`Routing` turns the mask into index lists once per forward
(one device sync), and :func:`route` applies one of two modules to each
token of a padded batch with those indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Routing", "route"]

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Routing:
    """Flat token indices (into ``B * T``) of each expert; None when an expert has no token."""

    und_idx: torch.Tensor | None
    gen_idx: torch.Tensor | None

    @classmethod
    def build(cls, gen_mask: torch.Tensor | None) -> Routing:
        """From a [B, T] bool mask (True = generation expert); None means all understanding."""
        if gen_mask is None:
            return cls(None, None)
        flat = gen_mask.reshape(-1)
        gen_idx = flat.nonzero().squeeze(-1)
        n_gen = gen_idx.numel()
        if n_gen == 0:
            return cls(None, None)
        if n_gen == flat.numel():
            return cls(None, gen_idx)
        return cls((~flat).nonzero().squeeze(-1), gen_idx)

    @property
    def mixed(self) -> bool:
        return self.und_idx is not None and self.gen_idx is not None


def route(x: torch.Tensor, routing: Routing, und: Fn, gen: Fn) -> torch.Tensor:
    """Apply ``gen`` to the generation tokens of ``x`` [B, T, ...] and ``und`` to the others.

    With no generation token this is just ``und(x)`` (the common text-only
    case); with only generation tokens, ``gen(x)``.
    """
    if routing.gen_idx is None:
        return und(x)
    if routing.und_idx is None:
        return gen(x)
    b, t = x.shape[:2]
    flat = x.reshape(b * t, *x.shape[2:])
    und_out = und(flat.index_select(0, routing.und_idx))
    gen_out = gen(flat.index_select(0, routing.gen_idx))
    out = und_out.new_empty((b * t, *und_out.shape[1:]))
    out.index_copy_(0, routing.und_idx, und_out)
    out.index_copy_(0, routing.gen_idx, gen_out.to(und_out.dtype))
    return out.reshape(b, t, *und_out.shape[1:])
