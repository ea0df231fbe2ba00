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
from torch import nn

from mstar.layers.attention import AttnBatch
from mstar.layers.gqa import GQAttention
from mstar.layers.kv_cache import KVCache
from mstar.layers.mlp import GatedMLP, gelu_tanh

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


class GemmaMLP(GatedMLP):
    """GeGLU feed-forward with the tanh GELU approximation (plain ``nn.Linear`` projections)."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__(width, mlp_dim, act=gelu_tanh, linear=nn.Linear)


def _attention(dims: GemmaDims) -> GQAttention:
    # Plain nn.Linear projections, as pi0.5 was validated; the attention itself runs on the KV cache.
    return GQAttention(dims.width, dims.num_heads, dims.num_kv_heads, dims.head_dim, linear=nn.Linear)


def _norm(dims: GemmaDims, cond_dim: int | None) -> nn.Module:
    return GemmaRMSNorm(dims.width, dims.eps) if cond_dim is None else AdaRMSNorm(dims.width, cond_dim, dims.eps)


def _gated_add(residual: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return residual + branch if gate is None else residual + branch * gate


class GemmaLayer(nn.Module):
    """One pre-norm decoder layer; adaptive norms (and gated residuals) when ``cond_dim`` is set."""

    def __init__(self, dims: GemmaDims, cond_dim: int | None = None) -> None:
        super().__init__()
        self.self_attn = _attention(dims)
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
        x = _gated_add(x, self.self_attn(h, *rope, cache, layer, batch), gate)
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
