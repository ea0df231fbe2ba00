"""Checking a V-JEPA 2 request's media and tensor arguments (caller thread).

Every failure is a typed 400 error that names the expected shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mstar.errors import InvalidParameterError, MediaError, ShapeError
from mstar.media import MediaItem, decode_image, decode_video

__all__ = ["decode_frames", "float_array"]


def decode_frames(item: MediaItem, what: str) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3] from a video (or, for the modality "image", one frame)."""
    if item.modality == "image":
        return decode_image(item)[None]
    frames, _fps = decode_video(item)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"{what} {item.name!r} decoded to shape {frames.shape}; expected [T, H, W, 3]", param="video")
    return frames


def float_array(name: str, value: Any, shape: tuple[int | str, ...]) -> np.ndarray:
    """``value`` as float32 of ``shape`` (ints fix a size, strings name a free one); ShapeError otherwise.

    A leading free axis may be omitted (a [7] state stands for [1, 7]).
    """
    spec = "[" + ", ".join(str(s) for s in shape) + "]"
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"{name} must be a numeric array of shape {spec}, got {type(value).__name__}", param=name
        ) from None
    if arr.ndim == len(shape) - 1 and isinstance(shape[0], str):
        arr = arr[None]
    if arr.ndim != len(shape) or any(isinstance(s, int) and s != d for s, d in zip(shape, arr.shape, strict=True)):
        raise ShapeError(f"{name} must have shape {spec}; got {list(arr.shape)}", param=name)
    if arr.size == 0 or any(d == 0 for d in arr.shape):
        raise ShapeError(f"{name} must have shape {spec} with no empty axis; got {list(arr.shape)}", param=name)
    if not np.isfinite(arr).all():
        raise InvalidParameterError(f"{name} holds NaN or infinite values", param=name)
    return arr.astype(np.float32)
