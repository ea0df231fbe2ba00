"""Rectified-flow sampling math: shifted timestep grids, Euler steps, and classifier-free guidance.

Conventions follow the "velocity points from data to noise" form: ``x_t =
(1 - t) * x_0 + t * noise``, time runs from 1 (noise) to 0 (data), and the
model predicts ``v = noise - x_0``, so one Euler step is ``x - v * dt`` with
``dt > 0``. Everything here is plain tensor math with no model inside, so a
unit test can pin it on small hand-computed tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "RENORM_TYPES",
    "cfg_active",
    "combine_guidance",
    "euler_step",
    "patchify_latent",
    "shift_timesteps",
    "timestep_schedule",
    "unpatchify_latent",
]

RenormType = Literal["global", "channel", "text_channel"]
RENORM_TYPES: tuple[str, ...] = ("global", "channel", "text_channel")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp ``t`` in [0, 1] towards 1 (more time near pure noise): ``s*t / (1 + (s-1)*t)``."""
    return shift * t / (1 + (shift - 1) * t)


def timestep_schedule(
    num_timesteps: int, shift: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The times visited and the step sizes: ``num_timesteps`` grid points from 1 to 0, shifted.

    Returns ``(times, dts)``, each of length ``num_timesteps - 1``: step ``i``
    evaluates the model at ``times[i]`` and moves by ``dts[i]`` towards 0.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
    grid = shift_timesteps(torch.linspace(1, 0, num_timesteps, device=device), shift)
    return grid[:-1], grid[:-1] - grid[1:]


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: float | torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE towards data: ``x - v * dt``."""
    return x - v.to(x.dtype) * dt


def cfg_active(t: float, interval: tuple[float, float]) -> bool:
    """Guidance applies while ``interval[0] < t <= interval[1]``; outside it the plain prediction is used."""
    return interval[0] < t <= interval[1]


def _norm(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    return (
        torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True) if per_token else torch.linalg.vector_norm(x.float())
    )


def combine_guidance(
    v_cond: torch.Tensor,
    v_text: torch.Tensor | None,
    v_img: torch.Tensor | None,
    *,
    text_scale: float,
    img_scale: float,
    renorm_type: str = "global",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """Mix one image's velocity predictions ([N, D] tokens) with text and image guidance.

    ``v_text`` is the prediction without the text (the image-only context),
    ``v_img`` the one without the input image. Text guidance is applied first,
    image guidance on top, and the result is rescaled so its norm never
    exceeds the conditional prediction's (clamped to ``[renorm_min, 1]``):
    over the whole image ("global"), per token ("channel"), or per token on
    the text-guided prediction only ("text_channel").
    """
    if text_scale <= 1.0 or v_text is None:
        return v_cond
    use_img = img_scale > 1.0 and v_img is not None
    if renorm_type == "text_channel":
        guided = v_text + text_scale * (v_cond - v_text)
        scale = (_norm(v_cond, True) / (_norm(guided, True) + 1e-8)).clamp(min=renorm_min, max=1.0)
        guided = guided * scale.to(guided.dtype)
        if use_img:
            assert v_img is not None
            guided = v_img + img_scale * (guided - v_img)
        return guided
    if renorm_type not in ("global", "channel"):
        raise ValueError(f"cfg_renorm_type must be one of {', '.join(RENORM_TYPES)}; got {renorm_type!r}")
    guided = v_text + text_scale * (v_cond - v_text)
    if use_img:
        assert v_img is not None
        guided = v_img + img_scale * (guided - v_img)
    per_token = renorm_type == "channel"
    scale = (_norm(v_cond, per_token) / (_norm(guided, per_token) + 1e-8)).clamp(min=renorm_min, max=1.0)
    return guided * scale.to(guided.dtype)


def patchify_latent(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] latent to [(H/p)*(W/p), p*p*C] tokens, row-major over patches, channels last."""
    c, h, w = latent.shape
    if h % patch or w % patch:
        raise ValueError(f"latent {h}x{w} is not divisible by the patch size {patch}")
    x = latent.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 2, 4, 0).reshape((h // patch) * (w // patch), patch * patch * c)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, patch: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify_latent`: [h*w, p*p*C] tokens to a [C, h*p, w*p] latent."""
    x = tokens.reshape(h, w, patch, patch, channels)
    return x.permute(4, 0, 2, 1, 3).reshape(channels, h * patch, w * patch)
