"""Checking a BAGEL request before it is queued: parts, images, output size, context length.

Runs on the caller's thread (``ModelRunner.validate``): bad input raises a
typed error here, and the decoded, resized images travel with the request.
"""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from mstar.errors import InvalidParameterError, InvalidRequestError, MediaError, WeightsError
from mstar.media import MediaItem, decode_image
from mstar.models.bagel.config import BagelConfig
from mstar.models.bagel.inputs import (
    GEN_THINK_SYSTEM_PROMPT,
    VLM_THINK_SYSTEM_PROMPT,
    fit_size,
    image_to_tensor,
    parts_from_inputs,
    resize_image,
)
from mstar.models.bagel.tokenizer import TextTokenizer
from mstar.request import RequestInputs

__all__ = ["DEFAULT_SIZE", "decode_on_white", "prepare_request", "with_marker_ids"]

DEFAULT_SIZE = 1024


def prepare_request(
    cfg: BagelConfig,
    tokenizer: TextTokenizer,
    max_len: int,
    inputs: RequestInputs,
    output_modalities: tuple[str, ...],
    p: dict[str, Any],
) -> dict[str, Any]:
    """Check a request and stash what the runner needs under ``_`` keys of its params ``p``.

    ``_mode`` ("chat" or "image"), ``_parts`` (ordered text and image parts),
    ``_images`` (resized tensors for the ViT and, when painting, the VAE) and
    ``_size`` (the output width and height).
    """
    if inputs.audio or inputs.video:
        raise InvalidRequestError("BAGEL accepts text and images only", param="input_modalities")
    images = [decode_on_white(item) for item in inputs.images]
    parts = parts_from_inputs(inputs.text, inputs.messages, len(images))
    if not any(pt.kind == "text" for pt in parts) and "image" in output_modalities:
        raise InvalidRequestError("image generation and editing need a text prompt", param="text")
    mode = "image" if "image" in output_modalities else "chat"
    p["_mode"] = mode
    interval = p["cfg_interval"]
    if len(interval) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval):
        raise InvalidParameterError("cfg_interval must be two numbers [start, end]", param="cfg_interval")
    p["cfg_interval"] = [float(interval[0]), float(interval[1])]
    if p["cfg_interval"][0] > p["cfg_interval"][1]:
        raise InvalidParameterError("cfg_interval must be [start, end] with start <= end", param="cfg_interval")
    if mode != "image":
        for name in ("width", "height"):
            if p[name] is not None:
                raise InvalidParameterError(f"{name} applies to image output only", param=name)
    if p["cfg_img_scale"] is None:
        p["cfg_img_scale"] = 2.0 if images else 1.0
    p["_size"] = _output_size(cfg, p, images, mode)
    p["_images"] = _prepare_images(cfg, images, mode, p["_size"])
    p["_parts"] = parts
    _check_length(cfg, tokenizer, max_len, p)
    return p


def _output_size(cfg: BagelConfig, p: dict[str, Any], images: list[np.ndarray], mode: str) -> tuple[int, int] | None:
    """(width, height) of the image to paint: asked for, else the edited image's size, else 1024 (capped)."""
    if mode != "image":
        return None
    stride, top = cfg.latent_downsample, cfg.max_image_side
    w, h = p["width"], p["height"]
    if w is None and h is None and images:
        last = images[-1]
        return fit_size(last.shape[1], last.shape[0], cfg.vae_image_max, cfg.vae_image_min, stride)
    w = w if w is not None else (h if h is not None else min(DEFAULT_SIZE, top))
    h = h if h is not None else w
    for name, v in (("width", w), ("height", h)):
        if v % stride or not stride <= v <= top:
            raise InvalidParameterError(
                f"{name} must be a multiple of {stride} between {stride} and {top}; got {v}", param=name
            )
    return int(w), int(h)


def _prepare_images(
    cfg: BagelConfig, images: list[np.ndarray], mode: str, size: tuple[int, int] | None
) -> list[dict[str, torch.Tensor]]:
    """Resize each image for the ViT (always) and, when painting, for the VAE (the edit source)."""
    out = []
    c = cfg
    for i, rgb in enumerate(images):
        if min(rgb.shape[:2]) < 2:
            raise MediaError(f"image {i} is too small ({rgb.shape[1]}x{rgb.shape[0]})", param="image")
        vw, vh = fit_size(rgb.shape[1], rgb.shape[0], c.vit_image_max, c.vit_image_min, c.vit.patch_size)
        entry = {"vit": image_to_tensor(resize_image(rgb, vw, vh))}
        if mode == "image":
            # The edit source is painted over at the output size.
            assert size is not None
            entry["vae"] = image_to_tensor(resize_image(rgb, size[0], size[1]))
        out.append(entry)
    return out


def _context_len(cfg: BagelConfig, tokenizer: TextTokenizer, p: dict[str, Any]) -> int:
    c = cfg
    n = 0
    if p["think_mode"]:
        sys_prompt = GEN_THINK_SYSTEM_PROMPT if p["_mode"] == "image" else VLM_THINK_SYSTEM_PROMPT
        n += len(tokenizer.encode(sys_prompt)) + 2
    for part in p["_parts"]:
        if part.kind == "text":
            n += len(tokenizer.encode(part.text)) + 2
        else:
            img = p["_images"][part.image]
            _, vh, vw = img["vit"].shape
            n += (vh // c.vit.patch_size) * (vw // c.vit.patch_size) + 2
            if "vae" in img:
                _, h, w = img["vae"].shape
                n += (h // c.latent_downsample) * (w // c.latent_downsample) + 2
    return n


def _check_length(cfg: BagelConfig, tokenizer: TextTokenizer, max_len: int, p: dict[str, Any]) -> None:
    ctx = _context_len(cfg, tokenizer, p)
    p["_context_len"] = ctx
    need = ctx
    if p["_mode"] == "image":
        w, h = p["_size"]
        need += (w // cfg.latent_downsample) * (h // cfg.latent_downsample) + 2
        if p["think_mode"]:
            need += 8  # room for at least a short plan
    else:
        need += 2
    if need > max_len:
        raise InvalidRequestError(
            f"the request needs {need} context positions; this engine holds {max_len} per request",
            param="text",
        )


def decode_on_white(item: MediaItem) -> np.ndarray:
    """Decode to RGB; transparent images are composited on white, as the reference does."""
    rgb = decode_image(item)  # validates and raises MediaError on bad bytes
    from PIL import Image

    with Image.open(io.BytesIO(item.data)) as img:
        if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
            return rgb
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)


def with_marker_ids(cfg: BagelConfig, tok: TextTokenizer) -> BagelConfig:
    """Take the marker ids from the checkpoint's tokenizer (they must exist in it)."""
    ids: dict[str, Any] = {}
    for field_name, token in (
        ("bos_token_id", "<|im_start|>"),
        ("eos_token_id", "<|im_end|>"),
        ("start_of_image", "<|vision_start|>"),
        ("end_of_image", "<|vision_end|>"),
    ):
        found = tok.token_id(token)
        if found is None:
            raise WeightsError(f"the checkpoint's tokenizer lacks {token}")
        ids[field_name] = found
    return replace(cfg, **ids)
