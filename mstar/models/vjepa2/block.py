"""The pre-norm transformer block of V-JEPA 2's encoder and its AC predictor.

Both stack ``x + attn(norm1(x)); x + mlp(norm2(x))`` with LayerNorms and an
exact-GELU MLP; they differ only in their attention (separate or fused
projections, with or without a mask) and in the name the checkpoints give it
(``attention`` in the encoder, ``attn`` in the predictor), so the block takes
both from its caller.
"""

from __future__ import annotations

import torch
from torch import nn

from mstar.layers.mlp import FeedForward

__all__ = ["PreNormBlock"]


class PreNormBlock(nn.Module):
    """``norm1``, the given attention (registered as ``attn_name``), ``norm2``, ``mlp.fc1``/``fc2``."""

    def __init__(self, dim: int, mlp_hidden: int, eps: float, attn: nn.Module, *, attn_name: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.add_module(attn_name, attn)
        self._attn_name = attn_name
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, *attn_args: torch.Tensor) -> torch.Tensor:
        """``attn_args`` (rotary tables, a mask) go to the attention after the normalised input."""
        attn = getattr(self, self._attn_name)
        x = x + attn(self.norm1(x), *attn_args)
        return x + self.mlp(self.norm2(x))
