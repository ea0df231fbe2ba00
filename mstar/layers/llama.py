"""A Llama-architecture decoder (Llama 2/3, SmolLM, Orpheus) over the shared slot KV cache.

One forward call runs any mix of requests: each row of ``input_ids`` appends
``batch.new_lens[b]`` tokens (a prefill chunk, or one decode token) to its
own cache slot, described by an :class:`~mstar.layers.attention.AttnBatch`.
Parameter names are those of Hugging Face ``LlamaForCausalLM``
(``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
..., ``lm_head.weight``), so published safetensors load without renaming.
Projections are :class:`~mstar.layers.invariant.BatchInvariantLinear` (plain
``nn.Linear`` on GPUs): on a CPU a request's logits are then bitwise the same
whatever else shares its batch, so seeded sampling does not depend on load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from mstar.layers.attention import AttnBatch
from mstar.layers.gqa import GQAttention
from mstar.layers.invariant import BatchInvariantLinear as Linear
from mstar.layers.kv_cache import KVCache
from mstar.layers.mlp import GatedMLP
from mstar.layers.norms import RMSNorm
from mstar.layers.rotary import rope_inv_freq

__all__ = ["LlamaConfig", "LlamaForCausalLM", "RMSNorm"]


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture hyper-parameters (the subset of HF ``config.json`` that shapes the model)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Read an HF Llama ``config.json`` dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        heads = int(d["num_attention_heads"])
        rope = d.get("rope_parameters")
        theta = d.get("rope_theta")
        scaling = d.get("rope_scaling")
        if isinstance(rope, dict):
            theta = rope.get("rope_theta", theta)
            if rope.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.self_attn = GQAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, bias=cfg.attention_bias
        )
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, batch: AttnBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm (HF's ``model.`` prefix)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head. ``forward`` advances a batch of cache slots and returns logits."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # The RoPE table is derived from the config, not a weight. It is kept outside the module
        # tree in float32 on purpose: ``model.to(bfloat16)`` would otherwise round the
        # frequencies, and a model built on the meta device would have none. Moved lazily.
        with torch.device("cpu"):
            self._rope_inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, T, head_dim] in float32 for absolute ``positions`` [B, T]."""
        inv = self._rope_inv_freq
        if inv.device != positions.device:
            inv = self._rope_inv_freq = inv.to(positions.device)
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def new_cache(
        self,
        num_slots: int,
        max_len: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        block_size: int = 16,
        num_blocks: int | None = None,
        factory: Callable[..., KVCache] = KVCache,
    ) -> KVCache:
        """A paged cache shaped for this model (``num_blocks`` default: every slot at ``max_len``).

        ``factory`` builds it (tensor parallelism passes one that keeps this rank's heads)."""
        cfg = self.config
        return factory(
            num_layers=cfg.num_hidden_layers,
            num_slots=num_slots,
            max_len=max_len,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            device=device,
            dtype=dtype,
            block_size=block_size,
            num_blocks=num_blocks,
        )

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache, batch: AttnBatch) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] for ``input_ids`` [B, T] (padding rows are ignored)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(batch.positions)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, batch)
        return self.model.norm(x)

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache, batch: AttnBatch, *, last_only: bool = True
    ) -> torch.Tensor:
        """Run ``input_ids`` [B, T] (right-padded to ``max(batch.new_lens)``) through the model.

        Writes the new keys/values into the rows' slots; the caller calls
        ``batch.commit(cache)`` to make them part of the context. Returns
        logits [B, V] for each row's last valid token when ``last_only``
        (the only ones decoding needs), else [B, T, V].
        """
        h = self.hidden_states(input_ids, cache, batch)
        if last_only:
            last = torch.tensor(batch.new_lens, device=h.device) - 1
            h = h[torch.arange(h.shape[0], device=h.device), last]
        return self.lm_head(h)
