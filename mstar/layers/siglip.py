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

__all__ = ["SiglipDims", "SiglipVisionTransformer"]


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
    def __init__(self, dims: SiglipDims) -> None:
        super().__init__()
        self.num_heads = dims.num_heads
        self.q_proj = nn.Linear(dims.width, dims.width)
        self.k_proj = nn.Linear(dims.width, dims.width)
        self.v_proj = nn.Linear(dims.width, dims.width)
        self.out_proj = nn.Linear(dims.width, dims.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, w // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class _MLP(nn.Module):
    def __init__(self, dims: SiglipDims) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims.width, dims.mlp_dim)
        self.fc2 = nn.Linear(dims.mlp_dim, dims.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Layer(nn.Module):
    def __init__(self, dims: SiglipDims) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dims.width, eps=dims.eps)
        self.self_attn = _Attention(dims)
        self.layer_norm2 = nn.LayerNorm(dims.width, eps=dims.eps)
        self.mlp = _MLP(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, dims: SiglipDims) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dims) for _ in range(dims.depth))


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
