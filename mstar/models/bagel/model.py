"""The BAGEL module tree, named as in the published ``ema.safetensors``.

``language_model`` (Qwen2 MoT), ``vit_model`` (SigLIP), ``connector`` (ViT to
LLM width), ``vit_pos_embed`` / ``latent_pos_embed`` (fixed 2D sin-cos tables
stored in the checkpoint), ``time_embedder`` (sinusoid + MLP of the flow
time), and ``vae2llm`` / ``llm2vae`` (latent patches in and velocities out).
The VAE is a separate module and file (``ae.safetensors``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mstar.models.bagel.config import BagelConfig
from mstar.models.bagel.language_model import Qwen2MoTForCausalLM
from mstar.models.bagel.vit import SiglipVisionModel

__all__ = ["Bagel", "sincos_2d", "timestep_frequencies"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """DiT's fixed 2D sin-cos table [side*side, dim] (row-major ids): first half encodes the column, second the row."""
    rows = torch.arange(side, dtype=torch.float64)[:, None].expand(side, side)
    cols = torch.arange(side, dtype=torch.float64)[None, :].expand(side, side)
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [N, dim] of (fractional) times ``t`` [N]: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class PositionEmbedding(nn.Module):
    def __init__(self, side: int, hidden: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(sincos_2d(hidden, side), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[ids]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        return self.mlp(timestep_frequencies(t, self.freq_dim).to(first.weight.dtype))


class Connector(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cin, cout)
        self.fc2 = nn.Linear(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig) -> None:
        super().__init__()
        hidden = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.time_embedder = TimestepEmbedder(hidden, cfg.timestep_embed_dim)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, hidden)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = Connector(cfg.vit.hidden_size, hidden)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, hidden)

    def embed_latents(self, x: torch.Tensor, t: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        """Noisy latent tokens [N, p*p*z] at times ``t`` [N] and grid ids [N] to LLM inputs [N, H]."""
        w = self.vae2llm.weight
        return self.vae2llm(x.to(w.dtype)) + self.time_embedder(t) + self.latent_pos_embed(pos_ids).to(w.dtype)

    def embed_vit(self, patches: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        """One image's ViT patches to LLM inputs [N, H]."""
        feats = self.vit_model(patches, pos_ids)
        return self.connector(feats) + self.vit_pos_embed(pos_ids).to(feats.dtype)
