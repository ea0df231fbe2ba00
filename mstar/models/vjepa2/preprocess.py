"""Frames to model input, as the V-JEPA 2 references prepare them.

- V-JEPA 2 (transformers' ``VJEPA2VideoProcessor``): resize the shorter side
  to ``crop * 256 / 224`` (bilinear, antialiased), centre-crop ``crop x crop``.
- V-JEPA 2-AC (the release's DROID eval transform): a centre square crop
  resized to ``crop x crop``, i.e. shorter side to ``crop`` then centre-crop.

Any frame size is accepted and resized; frames stay uint8 (rounded after the
resize, as the reference's uint8 pipeline does) until :func:`normalize` runs
on the model's device, which keeps the per-request stash small.
"""

from __future__ import annotations

import numpy as np
import torch

from mstar.models.resize import FLOAT_BUDGET, resize_bilinear

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize", "resize_center_crop"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHUNK = 16  # frames resized at once (fewer when large): bounds the float32 working set for long HD clips


def resize_center_crop(frames: np.ndarray, crop: int, shorter_side: int) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> uint8 tensor [T, 3, crop, crop]."""
    t, h, w, _ = frames.shape
    scale = shorter_side / min(h, w)
    size = (shorter_side, int(w * scale)) if h <= w else (int(h * scale), shorter_side)
    out = []
    chunk = max(1, min(_CHUNK, FLOAT_BUDGET // (h * w * 3 * 4)))
    for i in range(0, t, chunk):
        x = torch.from_numpy(np.ascontiguousarray(frames[i : i + chunk])).permute(0, 3, 1, 2)
        x = resize_bilinear(x, size, antialias=True) if (h, w) != size else x.float()
        top = int(round((size[0] - crop) / 2.0))
        left = int(round((size[1] - crop) / 2.0))
        x = x[:, :, top : top + crop, left : left + crop]
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def normalize(frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> ImageNet-normalised float of ``dtype`` (computed in float32)."""
    mean = torch.tensor(IMAGENET_MEAN, device=frames.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=frames.device).view(3, 1, 1)
    return ((frames.float() / 255.0 - mean) / std).to(dtype)
