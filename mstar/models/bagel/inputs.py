"""Turning a request into BAGEL's interleaved context: text and image parts, resized images.

The reference feeds a list of parts (strings and images) into one context;
each text part is wrapped as ``<|im_start|> text <|im_end|>``, each image as
``<|vision_start|> tokens <|vision_end|>``. Images are resized so both sides
are multiples of the encoder's stride and the sides lie between a minimum
short edge and a maximum long edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mstar.errors import InvalidRequestError

__all__ = [
    "GEN_THINK_SYSTEM_PROMPT",
    "VLM_THINK_SYSTEM_PROMPT",
    "Part",
    "fit_size",
    "image_to_tensor",
    "parts_from_inputs",
    "resize_image",
]

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here"
)

_IMAGE_PART_TYPES = ("image", "image_url", "input_image")


@dataclass(frozen=True, slots=True)
class Part:
    """One context part: text, or the index of an input image."""

    kind: str  # "text" | "image"
    text: str = ""
    image: int = -1


def parts_from_inputs(text: str | None, messages: list[dict[str, Any]] | None, num_images: int) -> list[Part]:
    """Order the request's text and images; images not placed by a message part come first."""
    parts: list[Part] = []
    used = 0
    if messages:
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise InvalidRequestError(f"messages[{i}] must be an object with role and content", param="messages")
            content = msg.get("content")
            if content is None:
                continue
            if isinstance(content, str):
                if content.strip():
                    parts.append(Part("text", text=content))
                continue
            if not isinstance(content, list):
                raise InvalidRequestError(
                    f"messages[{i}].content must be a string or a list of parts", param="messages"
                )
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind in ("text", "input_text"):
                    t = item.get("text")
                    if not isinstance(t, str):
                        raise InvalidRequestError(
                            f"messages[{i}] has a text part without a text string", param="messages"
                        )
                    if t.strip():
                        parts.append(Part("text", text=t))
                elif kind in _IMAGE_PART_TYPES:
                    if used >= num_images:
                        raise InvalidRequestError(
                            f"messages refer to more images than the {num_images} given", param="messages"
                        )
                    parts.append(Part("image", image=used))
                    used += 1
                else:
                    raise InvalidRequestError(f"messages[{i}] has an unsupported part type {kind!r}", param="messages")
    if text is not None and text.strip():
        parts.append(Part("text", text=text))
    leading = [Part("image", image=j) for j in range(used, num_images)]
    return leading + parts


def _make_divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def fit_size(
    width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int = 14 * 14 * 9 * 1024
) -> tuple[int, int]:
    """The reference's resize rule: long edge <= max, short edge >= min, sides multiples of stride."""

    def apply(w: float, h: float, scale: float) -> tuple[int, int]:
        return _make_divisible(round(w * scale), stride), _make_divisible(round(h * scale), stride)

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = apply(width, height, scale)
    if w * h > max_pixels:
        w, h = apply(w, h, max_pixels / (w * h))
    if max(w, h) > max_size:
        w, h = apply(w, h, max_size / max(w, h))
    return w, h


def resize_image(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of an RGB uint8 array to ``width x height``."""
    from PIL import Image

    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    img = Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def image_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] to a float [3, H, W] tensor in [-1, 1]."""
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
