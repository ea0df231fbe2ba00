"""The Qwen3 decoder layer (QK-norm attention + MoE or dense MLP) on the shared slot KV cache.

One forward serves a whole batch: prefill chunks and single decode tokens of
different requests, padded to a common length; ``AttnBatch`` says where each
row's tokens go in the cache. Rotary cos/sin are computed by the caller (MRoPE
for the Thinker and Talker, plain RoPE for the code predictor) and shared by
all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mstar.layers.attention import AttnBatch
from mstar.layers.gqa import GQAttention
from mstar.layers.kv_cache import KVCache
from mstar.layers.mlp import GatedMLP
from mstar.layers.moe import SparseMoE
from mstar.layers.norms import RMSNorm
from mstar.models.qwen3_omni.config import head_dim

__all__ = ["DecoderLayer", "StackOutput", "run_layers"]


def _attention(cfg: dict[str, Any]) -> GQAttention:
    """Grouped-query attention with per-head RMSNorm on queries and keys."""
    eps = cfg.get("rms_norm_eps", 1e-6)
    return GQAttention(
        cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg), qk_norm_eps=eps
    )


class DecoderLayer(nn.Module):
    """Pre-norm attention + feed-forward; the feed-forward is MoE when the config has experts."""

    def __init__(self, cfg: dict[str, Any], index: int, *, dense: bool = False) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = _attention(cfg)
        sparse_step = cfg.get("decoder_sparse_step", 1) or 1
        use_moe = (
            not dense
            and cfg.get("num_experts", 0) > 0
            and index not in (cfg.get("mlp_only_layers") or [])
            and (index + 1) % sparse_step == 0
        )
        self.mlp: nn.Module
        if use_moe:
            self.mlp = SparseMoE(
                hidden,
                cfg["moe_intermediate_size"],
                cfg["num_experts"],
                cfg["num_experts_per_tok"],
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                shared_intermediate=cfg.get("shared_expert_intermediate_size"),
            )
        else:
            self.mlp = GatedMLP(hidden, cfg["intermediate_size"])
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int, batch: AttnBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass(slots=True)
class StackOutput:
    hidden: torch.Tensor  # [B, T, H] after the final norm
    captured: torch.Tensor | None  # [B, T, H] output of the requested layer, if any


def run_layers(
    layers: nn.ModuleList,
    norm: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    batch: AttnBatch,
    *,
    capture: int | None = None,
    deepstack: list[torch.Tensor] | None = None,
    deepstack_mask: torch.Tensor | None = None,
) -> StackOutput:
    """Run every layer, then the final norm.

    ``capture = k`` returns the hidden state after layer ``k - 1`` (index ``k``
    of Hugging Face's ``hidden_states`` tuple, taken before any deepstack
    addition). ``deepstack[i]`` [N, H] is added after layer ``i`` at the
    positions where ``deepstack_mask`` [B, T] is True (visual tokens).
    """
    captured = None
    for i, layer in enumerate(layers):
        x = layer(x, cos, sin, cache, i, batch)
        if capture is not None and i + 1 == capture:
            captured = x
        if deepstack is not None and deepstack_mask is not None and i < len(deepstack):
            x = x.clone()
            x[deepstack_mask] = x[deepstack_mask] + deepstack[i].to(x.dtype)
    if capture == 0:
        raise ValueError("capture must name a layer output (>= 1)")
    return StackOutput(norm(x), captured)
