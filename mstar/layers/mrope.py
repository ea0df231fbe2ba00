"""Multimodal RoPE (Qwen-VL / Qwen-Omni): three position streams (time, height, width) in one rotary.

Each token has a position per axis, ``positions [3, B, T]``. Text tokens use the
same value on all three axes, so for text this reduces to ordinary RoPE. In the
interleaved layout the rotary frequency pairs cycle t, h, w, t, h, w, ...: pair
``i`` takes its angle from axis ``i % 3`` while ``i < 3 * section[axis]``, and
from the time axis past that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["mrope_cos_sin", "text_positions"]


def mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int], *, interleaved: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, head_dim] for ``positions`` [3, B, T] (half-rotation layout, as ``apply_rotary`` expects)."""
    freqs = positions[..., None].float() * inv_freq.float().to(positions.device)  # [3, B, T, D/2]
    if interleaved:
        mixed = freqs[0].clone()
        for axis in (1, 2):
            sel = slice(axis, 3 * int(section[axis]), 3)
            mixed[..., sel] = freqs[axis][..., sel]
    else:  # contiguous sections: [t...t h...h w...w]
        parts = freqs.split(list(section), dim=-1)
        mixed = torch.cat([p[i] for i, p in enumerate(parts)], dim=-1)
    emb = torch.cat((mixed, mixed), dim=-1)
    return emb.cos(), emb.sin()


def text_positions(start: int | torch.Tensor, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions [3, length] of plain text starting at ``start`` (all axes equal)."""
    pos = torch.arange(length, device=device) + start
    return pos[None].expand(3, -1)
