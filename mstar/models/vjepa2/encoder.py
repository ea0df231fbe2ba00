"""The V-JEPA 2 video encoder: a ViT over 2x16x16 tubelets with 3D RoPE.

Parameter names match transformers' ``VJEPA2Model`` (``encoder.embeddings...``,
``encoder.layer.N...``, ``encoder.layernorm``), so a published hub
checkpoint loads as is; its ``predictor.*`` (mask-denoising) weights are not
needed for encoding and are skipped by the loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mstar.models.vjepa2.block import PreNormBlock
from mstar.models.vjepa2.config import EncoderConfig
from mstar.models.vjepa2.rope import apply_rope, grid_positions, rope_tables

__all__ = ["VJEPA2Backbone", "VJEPA2Encoder"]


class _PatchEmbeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.hidden_size, kernel_size=kernel, stride=kernel)


class _Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.patch_embeddings = _PatchEmbeddings(cfg)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # [B, T, C, H, W] -> [B, C, T, H, W] -> tokens [B, T/2 * grid * grid, D], frame-major raster order
        x = video.permute(0, 2, 1, 3, 4).to(self.patch_embeddings.proj.weight.dtype)
        return self.patch_embeddings.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.value = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, -1).transpose(1, 2)

        q = apply_rope(heads(self.query(x)), cos, sin)
        k = apply_rope(heads(self.key(x)), cos, sin)
        out = F.scaled_dot_product_attention(q, k, heads(self.value(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _layer(cfg: EncoderConfig) -> PreNormBlock:
    return PreNormBlock(cfg.hidden_size, cfg.mlp_hidden_size, cfg.layer_norm_eps, _Attention(cfg), attn_name="attention")


class VJEPA2Encoder(nn.Module):
    """Video [B, T, 3, crop, crop] (normalised) -> latents [B, T/tubelet * grid^2, hidden]."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.layer = nn.ModuleList(_layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.embeddings(video)
        frames = x.shape[1] // cfg.tokens_per_tubelet
        cos, sin = rope_tables(grid_positions(frames, cfg.grid_size, x.device), cfg.head_dim)
        for layer in self.layer:
            x = layer(x, cos, sin)
        return self.layernorm(x)


class VJEPA2Backbone(nn.Module):
    """Holds the encoder under ``encoder.`` so state dict keys match the hub checkpoints."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.encoder = VJEPA2Encoder(cfg)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(video)  # type: ignore[no-any-return]
