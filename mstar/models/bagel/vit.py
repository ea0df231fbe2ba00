"""BAGEL's SigLIP NaViT encoder: native-resolution patches, learned absolute positions.

The patch embedding is a linear layer over flattened 14x14x3 patches (the
reference converts SigLIP's convolution to one), and each image keeps its own
aspect ratio: position ids index a ``70 x 70`` grid row-major, so a
``h x w``-patch image uses the top-left corner of it. The encoder layers are
the shared :class:`~mstar.layers.siglip.SiglipEncoderLayer`.
"""

from __future__ import annotations

import torch
from torch import nn

from mstar.layers.siglip import SiglipEncoderLayer
from mstar.models.bagel.config import ViTConfig

__all__ = ["SiglipVisionModel", "grid_position_ids", "patchify_image"]


def patchify_image(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] to [(H/p)*(W/p), p*p*C] patches (row-major; within a patch: rows, columns, channels)."""
    c, h, w = image.shape
    x = image.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 2, 4, 0).reshape((h // patch) * (w // patch), patch * patch * c)


def grid_position_ids(h: int, w: int, max_per_side: int) -> torch.Tensor:
    """Flattened ids of an ``h x w`` grid inside a ``max_per_side``-wide one (extrapolating layout)."""
    return (torch.arange(h)[:, None] * max_per_side + torch.arange(w)[None, :]).flatten()


class _Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side**2, cfg.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.layer_norm_eps)
            for _ in range(cfg.num_hidden_layers)
        )


class _VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    """``vit_model.*`` of the checkpoint."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.vision_model = _VisionTransformer(cfg)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One image's patches [N, p*p*C] and grid ids [N] to features [N, hidden]."""
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding(position_ids)
        x = x[None]  # the shared layer attends over [B, T, D]; one image is a batch of one
        for layer in vm.encoder.layers:
            x = layer(x)
        return vm.post_layernorm(x[0])
