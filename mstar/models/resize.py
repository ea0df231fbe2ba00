"""Bilinear resizing of uint8 images into float32 without a float copy of a large original.

The model families resize camera images and video frames with ``F.interpolate`` on float32, as their
references do. Converting a large uint8 original to float32 first would hold 12 bytes a pixel (a
16 MP photo: 200 MB) per request. :func:`resize_bilinear` keeps that path for inputs whose float copy
fits :data:`FLOAT_BUDGET`, and otherwise resizes separably: along the width in strips of rows (the
height unchanged, so each row is resized exactly as the whole image's would be), then along the
height. That is the order torch's own CPU bilinear kernels work in, and the two paths gave identical
results in tests/test_media_caps.py (plain and antialiased, contiguous and channels-last inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FLOAT_BUDGET", "resize_bilinear"]

#: Bytes of float32 the resize may hold at once, besides its output.
FLOAT_BUDGET = 32 * 1024 * 1024


def resize_bilinear(
    x: torch.Tensor,
    size: tuple[int, int],
    *,
    antialias: bool = False,
    divide: float | None = None,
    budget: int = FLOAT_BUDGET,
) -> torch.Tensor:
    """uint8 (or float) ``[N, C, H, W]`` (any strides) -> float32 ``[N, C, *size]``, bilinear, half-pixel centres.

    ``divide``: the float values are divided by it before resizing (``255.0`` for [0, 1] input, as a
    reference that scales first does).
    """
    n, c, h, w = x.shape
    oh, ow = size

    def as_float(t: torch.Tensor) -> torch.Tensor:
        return t.float() / divide if divide is not None else t.float()

    if n * c * h * w * 4 <= budget:
        return F.interpolate(as_float(x), size=size, mode="bilinear", align_corners=False, antialias=antialias)
    # Separable: rows resized along the width a strip at a time, then the narrow result along the height.
    mid = torch.empty((n, c, h, ow), dtype=torch.float32)
    rows = max(1, budget // (n * c * w * 4))
    for r in range(0, h, rows):
        strip = as_float(x[:, :, r : r + rows])
        mid[:, :, r : r + rows] = F.interpolate(
            strip, size=(strip.shape[2], ow), mode="bilinear", align_corners=False, antialias=antialias
        )
    return F.interpolate(mid, size=size, mode="bilinear", align_corners=False, antialias=antialias)
