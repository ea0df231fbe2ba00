"""The V-JEPA 2-AC action-conditioned predictor.

Every frame contributes ``[action, state, (extrinsics,) patch tokens...]`` to
one sequence; attention is block-causal over frames (a token of frame ``t``
sees every token of frames ``<= t``), so the tokens of frame ``t`` predict
the latents of frame ``t + 1``. Parameter names follow the release's
``VisionTransformerPredictorAC`` (``predictor_embed``, ``action_encoder``,
``state_encoder``, ``extrinsics_encoder``, ``predictor_blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``predictor_norm``,
``predictor_proj``).

The release splits the conditioning tokens out to rotate only their frame
axis; giving them row and column 0 (an identity rotation) and running one
sequence is the same computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mstar.models.vjepa2.block import PreNormBlock
from mstar.models.vjepa2.config import ACPredictorConfig
from mstar.models.vjepa2.rope import apply_rope, rope_tables

__all__ = ["ACPredictor", "block_causal_mask", "frame_positions"]


def block_causal_mask(num_frames: int, tokens_per_frame: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [N, N] mask (True = may attend): query frame i sees key frames j <= i only."""
    frame = torch.arange(num_frames * tokens_per_frame, device=device) // tokens_per_frame
    return frame[:, None] >= frame[None, :]


def frame_positions(num_frames: int, cond_tokens: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """(frame, row, column) [3, N] of the interleaved sequence; conditioning tokens sit at row = column = 0."""
    per_frame = cond_tokens + grid * grid
    ids = torch.arange(per_frame, device=device)
    patch = (ids - cond_tokens).clamp(min=0)
    is_patch = ids >= cond_tokens
    rows = torch.where(is_patch, patch // grid, 0)
    cols = torch.where(is_patch, patch % grid, 0)
    frames = torch.arange(num_frames, device=device)
    return torch.stack([frames.repeat_interleave(per_frame), rows.repeat(num_frames), cols.repeat(num_frames)]).float()


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _block(cfg: ACPredictorConfig) -> PreNormBlock:
    d = cfg.predictor_embed_dim
    return PreNormBlock(d, cfg.mlp_hidden_size, cfg.layer_norm_eps, _Attention(d, cfg.num_heads), attn_name="attn")


class ACPredictor(nn.Module):
    """Latents [B, T*tokens, embed] + actions/states [B, T, 7] (+ extrinsics [B, T, 6]) -> next-frame latents."""

    def __init__(self, cfg: ACPredictorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.predictor_embed_dim
        self.predictor_embed = nn.Linear(cfg.embed_dim, d)
        self.action_encoder = nn.Linear(cfg.action_dim, d)
        self.state_encoder = nn.Linear(cfg.state_dim, d)
        # Present in the release checkpoint even when unused (use_extrinsics=False).
        self.extrinsics_encoder = nn.Linear(cfg.extrinsics_dim, d)
        self.predictor_blocks = nn.ModuleList(_block(cfg) for _ in range(cfg.depth))
        self.predictor_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.predictor_proj = nn.Linear(d, cfg.embed_dim)

    def forward(
        self,
        latents: torch.Tensor,
        actions: torch.Tensor,
        states: torch.Tensor,
        extrinsics: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return [B, T*tokens, embed]: at frame t, the prediction of frame t + 1."""
        cfg = self.cfg
        b, n, _ = latents.shape
        frames = n // cfg.tokens_per_frame
        x = self.predictor_embed(latents).view(b, frames, cfg.tokens_per_frame, -1)
        cond = [self.action_encoder(actions), self.state_encoder(states)]
        if cfg.use_extrinsics:
            if extrinsics is None:
                raise ValueError("this predictor was built with use_extrinsics=True: pass extrinsics")
            cond.append(self.extrinsics_encoder(extrinsics))
        x = torch.cat([c.unsqueeze(2) for c in cond] + [x], dim=2).flatten(1, 2)

        per_frame = cfg.cond_tokens + cfg.tokens_per_frame
        positions = frame_positions(frames, cfg.cond_tokens, cfg.grid_size, x.device)
        cos, sin = rope_tables(positions, cfg.predictor_embed_dim // cfg.num_heads)
        mask = block_causal_mask(frames, per_frame, x.device)
        for block in self.predictor_blocks:
            x = block(x, cos, sin, mask)

        x = x.view(b, frames, per_frame, -1)[:, :, cfg.cond_tokens :].flatten(1, 2)
        return self.predictor_proj(self.predictor_norm(x))  # type: ignore[no-any-return]
