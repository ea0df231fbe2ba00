"""Flow-matching math of pi0.5: the time embedding and the Euler integration from noise to actions.

Time runs from 1 (pure noise) to 0 (actions) in ``num_steps`` equal steps:
step ``k`` evaluates the velocity at ``t_k = 1 - k / num_steps`` and moves
``x <- x + dt * v`` with ``dt = -1 / num_steps``. Plain tensor math, so unit
tests can pin it on hand-computed values.
"""

from __future__ import annotations

import math

import torch

__all__ = ["euler_dt", "euler_time", "euler_update", "time_embedding"]


def time_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sine-cosine embedding of times ``t`` [B] -> [B, dim] float32.

    Periods are spaced geometrically from ``min_period`` to ``max_period``
    over ``dim / 2`` frequencies; the first half holds the sines, the second
    the cosines. Computed in float64 (the angles reach ~1500 rad at t=1).
    """
    if dim % 2:
        raise ValueError(f"the time embedding width must be even, got {dim}")
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    angle = t.to(torch.float64)[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


def euler_dt(num_steps: int) -> float:
    return -1.0 / num_steps


def euler_time(step: int, num_steps: int) -> float:
    """The time at which step ``step`` (0-based) evaluates the velocity."""
    return 1.0 + step * euler_dt(num_steps)


def euler_update(x: torch.Tensor, v: torch.Tensor, num_steps: torch.Tensor | int) -> torch.Tensor:
    """One Euler step ``x + dt * v``; ``num_steps`` may differ per row ([B] tensor)."""
    if isinstance(num_steps, int):
        return x + euler_dt(num_steps) * v
    dt = (-1.0 / num_steps.to(x.dtype)).view(-1, *([1] * (x.dim() - 1)))
    return x + dt * v
