"""The Qwen2 Mixture-of-Transformers decoder (BAGEL's backbone) on the shared slot KV cache.

Each layer keeps Qwen2's understanding weights (``q_proj``, ``mlp``, ...) and a
generation twin with the ``_moe_gen`` suffix; ``gen_mask`` says which tokens
use the twin. Queries and keys are RMS-normalised per head (QK-norm) before
RoPE. RoPE positions are given explicitly because BAGEL gives every token
of an image one shared position, unlike the cache positions.
"""

from __future__ import annotations

import torch
from torch import nn

from mstar.layers.attention import AttnBatch, cached_attention
from mstar.layers.kv_cache import KVCache
from mstar.layers.mlp import GatedMLP
from mstar.layers.mot import Routing, route
from mstar.layers.norms import RMSNorm
from mstar.layers.rotary import RotaryEmbedding, apply_rotary
from mstar.models.bagel.config import LLMConfig

__all__ = ["Qwen2MoTForCausalLM"]


def _mlp(cfg: LLMConfig) -> GatedMLP:
    # Plain nn.Linear projections: BAGEL was validated against its reference with ordinary matmuls.
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size, linear=nn.Linear)


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, q_out, kv_out = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        )
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, q_out), nn.Linear(h, kv_out), nn.Linear(h, kv_out)
        self.o_proj = nn.Linear(q_out, h, bias=False)
        self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps), RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.q_proj_moe_gen, self.k_proj_moe_gen = nn.Linear(h, q_out), nn.Linear(h, kv_out)
        self.v_proj_moe_gen = nn.Linear(h, kv_out)
        self.o_proj_moe_gen = nn.Linear(q_out, h, bias=False)
        self.q_norm_moe_gen = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm_moe_gen = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def _qkv(self, x: torch.Tensor, gen: bool) -> torch.Tensor:
        sfx = "_moe_gen" if gen else ""
        lead = x.shape[:-1]
        q = getattr(self, "q_norm" + sfx)(getattr(self, "q_proj" + sfx)(x).view(*lead, self.n_heads, self.head_dim))
        k = getattr(self, "k_norm" + sfx)(getattr(self, "k_proj" + sfx)(x).view(*lead, self.n_kv, self.head_dim))
        v = getattr(self, "v_proj" + sfx)(x).view(*lead, self.n_kv, self.head_dim)
        return torch.cat([q, k, v], dim=-2)  # [..., Hq + 2*Hkv, D]

    def forward(
        self,
        x: torch.Tensor,
        routing: Routing,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        batch: AttnBatch,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = route(x, routing, lambda z: self._qkv(z, False), lambda z: self._qkv(z, True))
        qkv = qkv.transpose(1, 2)  # [B, Hq + 2*Hkv, T, D]
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = cached_attention(q.contiguous(), k.contiguous(), v.contiguous(), cache, self.layer, batch, mask=mask)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return route(out, routing, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = MoTAttention(cfg, layer)
        self.mlp = _mlp(cfg)
        self.mlp_moe_gen = _mlp(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        routing: Routing,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        batch: AttnBatch,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = route(x, routing, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, routing, cos, sin, cache, batch, mask)
        und = lambda z: self.mlp(self.post_attention_layernorm(z))  # noqa: E731
        gen = lambda z: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(z))  # noqa: E731
        return x + route(x, routing, und, gen)


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class Qwen2MoTForCausalLM(nn.Module):
    """``language_model.*`` of the checkpoint: ``model.*`` plus ``lm_head``."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope_positions: torch.Tensor,
        gen_mask: torch.Tensor | None,
        cache: KVCache,
        batch: AttnBatch,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run embeddings ``x`` [B, T, H] through the decoder; returns final-norm hidden states.

        Keys and values of the new tokens are written to the cache at the
        batch's positions; call ``batch.commit(cache)`` to keep them. ``mask``
        [B, 1, T, kv_len] (True = attend) replaces the batch's causal or
        bidirectional one (a prefill row packing text and image segments).
        """
        cos, sin = self.model.rotary_emb(rope_positions)
        routing = Routing.build(gen_mask)
        for layer in self.model.layers:
            x = layer(x, routing, cos, sin, cache, batch, mask)
        return route(x, routing, self.model.norm, self.model.norm_moe_gen)
