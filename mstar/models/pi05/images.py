"""Camera images to SigLIP input: resize keeping the aspect ratio, pad to a square, scale to [-1, 1].

As openpi does: the longer side is scaled to ``size`` (bilinear), the
shorter side centred and padded with black, then pixel values map from
[0, 1] to [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mstar.errors import ShapeError
from mstar.models.resize import resize_bilinear

__all__ = ["MIN_SIDE", "preprocess_image"]

#: Smaller images hold less than one SigLIP patch of content: refused rather than blown up.
MIN_SIDE = 14


def preprocess_image(rgb: np.ndarray, size: int, name: str = "image") -> torch.Tensor:
    """An RGB uint8 array [H, W, 3] -> a float32 tensor [3, size, size] in [-1, 1]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ShapeError(
            f"{name} must be an RGB image [H, W, 3]; got an array of shape {tuple(rgb.shape)}", param="images"
        )
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    if min(h, w) < MIN_SIDE or min(rh, rw) < 1:
        raise ShapeError(
            f"{name} is {w}x{h}; pi05 expects camera images [H, W, 3] with both sides >= {MIN_SIDE} px "
            f"(they are resized with padding to {size}x{size})",
            param="images",
        )
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    if (h, w) == (size, size):
        x = x.float() / 255.0
    else:
        # Resized from uint8 (in strips for a large photo), then scaled: no float copy of the original.
        x = resize_bilinear(x, (rh, rw), divide=255.0).clamp_(0.0, 1.0)
        top, left = (size - rh) // 2, (size - rw) // 2
        x = F.pad(x, (left, size - rw - left, top, size - rh - top), value=0.0)
    return x[0] * 2.0 - 1.0
