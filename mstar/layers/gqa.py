"""Grouped-query self-attention on the shared slot KV cache, with optional QK-norm.

The projection and head layout of Llama-style decoders (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, biases optional; Qwen3 adds per-head
``q_norm``/``k_norm`` RMSNorms before RoPE). The attention itself is
:func:`~mstar.layers.attention.cached_attention`; rotary cos/sin come from the
caller, computed once per step and shared by all layers.
"""

from __future__ import annotations

import torch
from torch import nn

from mstar.layers.attention import AttnBatch, cached_attention
from mstar.layers.invariant import BatchInvariantLinear
from mstar.layers.kv_cache import KVCache
from mstar.layers.norms import RMSNorm
from mstar.layers.rotary import apply_rotary

__all__ = ["GQAttention"]


class GQAttention(nn.Module):
    """``num_heads`` query heads over ``num_kv_heads`` key/value heads of ``head_dim``.

    ``linear`` picks the projection class (batch-invariant on the CPU by
    default, ``nn.Linear`` where a family was validated with plain matmuls);
    ``qk_norm_eps`` adds Qwen3's per-head RMSNorm on queries and keys.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        linear: type[nn.Linear] = BatchInvariantLinear,
        qk_norm_eps: float | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.v_proj = linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.o_proj = linear(num_heads * head_dim, hidden, bias=bias)
        self.q_norm = None if qk_norm_eps is None else RMSNorm(head_dim, qk_norm_eps)
        self.k_norm = None if qk_norm_eps is None else RMSNorm(head_dim, qk_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        batch: AttnBatch,
    ) -> torch.Tensor:
        """``x`` [B, T, hidden] -> [B, T, hidden]; K/V of the new tokens go to ``cache`` layer ``layer``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = cached_attention(q, k, v, cache, layer, batch, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
