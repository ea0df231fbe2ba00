"""The 3D rotary position embedding of V-JEPA 2 (frame, row, column).

Each head's first ``3 * P`` dims are split in three slices of ``P`` dims
(``P = 2 * ((head_dim // 3) // 2)``), rotated by the token's frame, row and
column index; the remaining dims are left as they are. Within a slice the
release pairs adjacent dims ``(2i, 2i+1)`` but takes their angle from the
concatenation ``[f, f]`` of the ``P/2`` frequencies, not from ``f`` repeated
per pair. The checkpoints were trained that way, so it is kept.

The tables are built once per forward (not per layer and head) and applied as
``x * cos + rotate_pairs(x) * sin``; a position of 0 gives the identity,
which is how the AC predictor's action and state tokens skip the row and
column rotations.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "grid_positions", "rope_tables"]


def rope_slice_dim(head_dim: int) -> int:
    """Dims rotated per axis."""
    return 2 * ((head_dim // 3) // 2)


def grid_positions(num_frames: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """(frame, row, column) of each patch token in raster order: a [3, T*grid*grid] float tensor."""
    ids = torch.arange(num_frames * grid * grid, device=device)
    per_frame = grid * grid
    frame = ids // per_frame
    rest = ids - frame * per_frame
    return torch.stack([frame, rest // grid, rest % grid]).float()


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [N, head_dim] (float32) for positions [3, N]."""
    part = rope_slice_dim(head_dim)
    half = part // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    n = positions.shape[1]
    cos = torch.ones(n, head_dim, dtype=torch.float32, device=positions.device)
    sin = torch.zeros(n, head_dim, dtype=torch.float32, device=positions.device)
    for axis in range(3):
        freq = positions[axis].float()[:, None] * omega[None, :]  # [N, P/2]
        lo = axis * part
        cos[:, lo : lo + part] = freq.cos().repeat(1, 2)
        sin[:, lo : lo + part] = freq.sin().repeat(1, 2)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., N, head_dim] by the tables [N, head_dim]."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
