"""Gemma decoder blocks on the shared KV cache, with optional adaptive RMSNorm (adaRMS).

Parameter names follow transformers' Gemma (``self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm`` ...), so checkpoints in that layout
load by name. A layer built with ``cond_dim`` swaps its norms for
:class:`AdaRMSNorm`: a condition vector (for example a flow-matching time
embedding) predicts a per-channel scale, shift and residual gate, as in the
pi0.5 action expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mstar.layers.attention import AttnBatch, cached_attention
from mstar.layers.kv_cache import KVCache
from mstar.layers.rotary import apply_rotary

__all__ = ["AdaRMSNorm", "GemmaDims", "GemmaLayer", "GemmaMLP", "GemmaRMSNorm", "GemmaStack", "rms_normalize"]


@dataclass(frozen=True, slots=True)
class GemmaDims:
    """The sizes of one Gemma decoder stack."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float = 1e-6


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` over the last axis, in float32 (bf16 variance loses too much)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the learned weight is stored as an offset from 1."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        out = rms_normalize(x, self.eps) * (1.0 + self.weight.float())
        return out.to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """RMSNorm whose scale, shift and residual gate come from a condition vector.

    ``dense`` maps ``cond`` [B, cond_dim] (one per row) or [B, T, cond_dim]
    (one per token) to ``3 * dim`` values: ``y = norm(x) * (1 + scale) + shift``,
    and ``gate`` multiplies the branch output before the residual add.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim, bias=True)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if cond is None:
            raise ValueError("AdaRMSNorm needs a condition vector")
        mod = self.dense(cond.to(self.dense.weight.dtype))
        if mod.dim() == 2 and x.dim() == 3:
            mod = mod[:, None, :]  # one modulation per row, shared by its tokens
        scale, shift, gate = mod.chunk(3, dim=-1)
        out = rms_normalize(x, self.eps) * (1.0 + scale.float()) + shift.float()
        return out.to(x.dtype), gate.to(x.dtype)


class GemmaMLP(nn.Module):
    """GeGLU feed-forward with the tanh GELU approximation."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaAttention(nn.Module):
    """Projections of one attention block (the attention itself runs on the KV cache)."""

    def __init__(self, dims: GemmaDims) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(dims.width, dims.num_heads * dims.head_dim, bias=False)
        self.k_proj = nn.Linear(dims.width, dims.num_kv_heads * dims.head_dim, bias=False)
        self.v_proj = nn.Linear(dims.width, dims.num_kv_heads * dims.head_dim, bias=False)
        self.o_proj = nn.Linear(dims.num_heads * dims.head_dim, dims.width, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        batch: AttnBatch,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = cached_attention(q, k, v, cache, layer, batch, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def _norm(dims: GemmaDims, cond_dim: int | None) -> nn.Module:
    return GemmaRMSNorm(dims.width, dims.eps) if cond_dim is None else AdaRMSNorm(dims.width, cond_dim, dims.eps)


def _gated_add(residual: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return residual + branch if gate is None else residual + branch * gate


class GemmaLayer(nn.Module):
    """One pre-norm decoder layer; adaptive norms (and gated residuals) when ``cond_dim`` is set."""

    def __init__(self, dims: GemmaDims, cond_dim: int | None = None) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(dims)
        self.mlp = GemmaMLP(dims.width, dims.mlp_dim)
        self.input_layernorm = _norm(dims, cond_dim)
        self.post_attention_layernorm = _norm(dims, cond_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        batch: AttnBatch,
        cond: torch.Tensor | None = None,
        *,
        attention_only: bool = False,
    ) -> torch.Tensor:
        """Run the layer; ``attention_only`` skips the MLP when only the cached K/V matter."""
        h, gate = self.input_layernorm(x, cond)
        x = _gated_add(x, self.self_attn(h, rope, cache, layer, batch), gate)
        if attention_only:
            return x
        h, gate = self.post_attention_layernorm(x, cond)
        return _gated_add(x, self.mlp(h), gate)


class GemmaStack(nn.Module):
    """``depth`` decoder layers and a final norm; ``embed_tokens`` only when ``vocab_size`` is given."""

    def __init__(self, dims: GemmaDims, *, vocab_size: int | None = None, cond_dim: int | None = None) -> None:
        super().__init__()
        self.dims = dims
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, dims.width)
        self.layers = nn.ModuleList(GemmaLayer(dims, cond_dim) for _ in range(dims.depth))
        self.norm = _norm(dims, cond_dim)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(width), as Gemma does on its input."""
        emb = self.embed_tokens(ids)
        return emb * torch.tensor(self.dims.width**0.5, dtype=emb.dtype)
