"""The SigLIP vision transformer (no pooling head), as used by PaliGemma.

Parameter names follow transformers' ``SiglipVisionTransformer``
(``embeddings.patch_embedding``, ``encoder.layers.N.self_attn.q_proj``,
``post_layernorm`` ...). Written out here rather than imported: it is
small, and importing transformers' model classes costs seconds per process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mstar.layers.mlp import FeedForward, gelu_tanh

__all__ = ["SiglipDims", "SiglipEncoderLayer", "SiglipVisionTransformer"]


@dataclass(frozen=True, slots=True)
class SiglipDims:
    """The sizes of a SigLIP vision tower."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class _Embeddings(nn.Module):
    def __init__(self, dims: SiglipDims) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, dims.width, kernel_size=dims.patch_size, stride=dims.patch_size)
        self.position_embedding = nn.Embedding(dims.num_patches, dims.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None]


class _Attention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, w // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class SiglipEncoderLayer(nn.Module):
    """One pre-norm SigLIP encoder layer over [B, T, width] (full attention, tanh-GELU MLP).

    Shared by every SigLIP tower (PaliGemma's here, BAGEL's NaViT), so the
    names ``layer_norm1``, ``self_attn.{q,k,v,out}_proj``, ``layer_norm2``,
    ``mlp.fc1``/``fc2`` are those of transformers' ``SiglipEncoderLayer``.
    """

    def __init__(self, width: int, mlp_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = _Attention(width, num_heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = FeedForward(width, mlp_dim, act=gelu_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, dims: SiglipDims) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(dims.width, dims.mlp_dim, dims.num_heads, dims.eps) for _ in range(dims.depth)
        )


class SiglipVisionTransformer(nn.Module):
    """Maps images [N, 3, S, S] in [-1, 1] to patch features [N, (S/patch)^2, width]."""

    def __init__(self, dims: SiglipDims) -> None:
        super().__init__()
        self.dims = dims
        self.embeddings = _Embeddings(dims)
        self.encoder = _Encoder(dims)
        self.post_layernorm = nn.LayerNorm(dims.width, eps=dims.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
