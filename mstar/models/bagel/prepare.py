"""Checking a BAGEL request before it is queued: kwargs, parts, images, output size, context length.

Both steps run on the caller's thread. :func:`validate_params_for` checks the
user's kwargs (``Request.params``); :func:`prepare_request` decodes and resizes
the images, orders the context parts and checks that everything fits in one
KV slot, returning the runner-private :class:`BagelPrepared`
(``Request.prepared``). Bad input raises a typed error in either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from mstar.errors import InvalidParameterError, InvalidRequestError, MediaError, WeightsError
from mstar.media import MediaItem, decode_image
from mstar.models.bagel.config import BagelConfig
from mstar.models.bagel.inputs import (
    GEN_THINK_SYSTEM_PROMPT,
    VLM_THINK_SYSTEM_PROMPT,
    Part,
    fit_size,
    image_to_tensor,
    parts_from_inputs,
    resize_image,
)
from mstar.models.bagel.tokenizer import TextTokenizer
from mstar.request import RequestInputs

__all__ = [
    "DEFAULT_SIZE",
    "BagelPrepared",
    "Mode",
    "PreparedImage",
    "check_params",
    "decode_budget",
    "decode_on_white",
    "guidance_branches",
    "kv_positions",
    "prepare_request",
    "with_marker_ids",
]

DEFAULT_SIZE = 1024

Mode = Literal["chat", "image"]


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """One input image, resized for the ViT and, when painting, for the VAE (the edit source)."""

    vit: torch.Tensor  # [3, h, w] in [-1, 1], sides multiples of the ViT patch
    vae: torch.Tensor | None  # [3, H, W] in [-1, 1] at the output size; None for chat


@dataclass(frozen=True, slots=True)
class BagelPrepared:
    """What the runner needs of a request, built before it is queued."""

    mode: Mode  # "chat" answers with text; "image" paints (after a plan, in think mode)
    parts: tuple[Part, ...]  # the context in order, the think-mode system prompt first
    images: tuple[PreparedImage, ...]  # indexed by the image parts
    size: tuple[int, int] | None  # (width, height) of the image to paint; None for chat
    context_len: int  # positions the parts fill in the conditional context
    part_lens: tuple[int, ...] = ()  # positions of each part, in order (they add up to context_len)


def _mode_of(output_modalities: tuple[str, ...]) -> Mode:
    return "image" if "image" in output_modalities else "chat"


def check_params(
    cfg: BagelConfig, inputs: RequestInputs, output_modalities: tuple[str, ...], p: dict[str, Any]
) -> dict[str, Any]:
    """Check the kwargs ``p`` (already typed and ranged) and fill the defaults that depend on the request."""
    interval = p["cfg_interval"]
    if len(interval) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval):
        raise InvalidParameterError("cfg_interval must be two numbers [start, end]", param="cfg_interval")
    p["cfg_interval"] = [float(interval[0]), float(interval[1])]
    if p["cfg_interval"][0] > p["cfg_interval"][1]:
        raise InvalidParameterError("cfg_interval must be [start, end] with start <= end", param="cfg_interval")
    stride, top = cfg.latent_downsample, cfg.max_image_side
    for name in ("width", "height"):
        v = p[name]
        if v is None:
            continue
        if _mode_of(output_modalities) != "image":
            raise InvalidParameterError(f"{name} applies to image output only", param=name)
        if v % stride or not stride <= v <= top:
            raise InvalidParameterError(
                f"{name} must be a multiple of {stride} between {stride} and {top}; got {v}", param=name
            )
    if p["cfg_img_scale"] is None:
        p["cfg_img_scale"] = 2.0 if inputs.images else 1.0
    return p


def prepare_request(
    cfg: BagelConfig,
    tokenizer: TextTokenizer,
    max_len: int,
    inputs: RequestInputs,
    output_modalities: tuple[str, ...],
    p: Mapping[str, Any],
) -> BagelPrepared:
    """Decode and place the inputs of a checked request and make sure its context fits ``max_len``."""
    if inputs.audio or inputs.video:
        raise InvalidRequestError("BAGEL accepts text and images only", param="input_modalities")
    images = [decode_on_white(item) for item in inputs.images]
    parts = parts_from_inputs(inputs.text, inputs.messages, len(images))
    if not any(pt.kind == "text" for pt in parts) and "image" in output_modalities:
        raise InvalidRequestError("image generation and editing need a text prompt", param="text")
    mode = _mode_of(output_modalities)
    if p["think_mode"]:
        parts.insert(0, Part("text", text=GEN_THINK_SYSTEM_PROMPT if mode == "image" else VLM_THINK_SYSTEM_PROMPT))
    size = _output_size(cfg, p, images) if mode == "image" else None
    prepared = _prepare_images(cfg, images, size)
    part_lens = _part_lens(cfg, tokenizer, parts, prepared)
    context_len = sum(part_lens)
    _check_length(cfg, max_len, context_len, size, think=p["think_mode"])
    return BagelPrepared(
        mode=mode, parts=tuple(parts), images=prepared, size=size, context_len=context_len, part_lens=tuple(part_lens)
    )


def guidance_branches(mode: Mode, p: Mapping[str, Any]) -> list[str]:
    """The contexts (one KV slot each) a request holds: "cond", and for guided pictures "text"
    (without the last text) and "img" (without the input images)."""
    if mode != "image":
        return ["cond"]
    out = ["cond"]
    if p["cfg_text_scale"] > 1.0:
        out.append("text")
        if p["cfg_img_scale"] > 1.0:
            out.append("img")
    return out


def _latent_positions(cfg: BagelConfig, size: tuple[int, int] | None) -> int:
    """Positions of the latent row being denoised (its tokens between two markers); 0 for chat."""
    if size is None:
        return 0
    w, h = size
    return (w // cfg.latent_downsample) * (h // cfg.latent_downsample) + 2


def decode_budget(cfg: BagelConfig, room: int, size: tuple[int, int] | None, max_output_tokens: int) -> int:
    """Tokens a request may decode (a chat answer or a think-mode plan) with ``room`` positions left
    after its context; a plan leaves room for its own markers and the latent row."""
    if size is not None:
        room -= _latent_positions(cfg, size) + 2
    return max(1, min(max_output_tokens, room - 1))


def kv_positions(cfg: BagelConfig, prep: BagelPrepared, p: Mapping[str, Any], max_len: int) -> dict[str, int]:
    """The most positions each context of a request writes (what its KV blocks are reserved for).

    cond: the parts, then the decoded answer, or (think mode) the plan decoded once and written
    again as a text part, then the latent row being denoised. "text": the parts before the last
    text, then the latent row. "img": the text parts, then the latent row. Denoising writes the
    latent row after each context without keeping it, so it counts once.
    """
    latents = _latent_positions(cfg, prep.size)
    decodes = prep.mode == "chat" or bool(p["think_mode"])
    decoded = decode_budget(cfg, max_len - prep.context_len, prep.size, p["max_output_tokens"]) if decodes else 0
    rewritten = decoded + 2 if decodes and prep.size is not None else 0  # the plan as a text part
    lens = prep.part_lens
    texts = [i for i, pt in enumerate(prep.parts) if pt.kind == "text"]
    last_text = texts[-1] if texts else len(lens)
    positions = {
        "cond": prep.context_len + max(decoded, rewritten) + latents,
        "text": sum(lens[:last_text]) + latents,
        "img": sum(lens[i] for i in texts) + latents,
    }
    return {name: min(max_len, positions[name]) for name in guidance_branches(prep.mode, p)}


def _output_size(cfg: BagelConfig, p: Mapping[str, Any], images: list[np.ndarray]) -> tuple[int, int]:
    """(width, height) of the image to paint: asked for, else the edited image's size, else 1024 (capped)."""
    w, h = p["width"], p["height"]
    if w is None and h is None and images:
        last = images[-1]
        return fit_size(last.shape[1], last.shape[0], cfg.vae_image_max, cfg.vae_image_min, cfg.latent_downsample)
    w = w if w is not None else (h if h is not None else min(DEFAULT_SIZE, cfg.max_image_side))
    h = h if h is not None else w
    return int(w), int(h)


def _prepare_images(
    cfg: BagelConfig, images: list[np.ndarray], size: tuple[int, int] | None
) -> tuple[PreparedImage, ...]:
    """Resize each image for the ViT (always) and, when painting, for the VAE at the output size."""
    out = []
    c = cfg
    for i, rgb in enumerate(images):
        if min(rgb.shape[:2]) < 2:
            raise MediaError(
                f"image {i} is {rgb.shape[1]}x{rgb.shape[0]}; BAGEL needs both sides at least 2 pixels", param="image"
            )
        vw, vh = fit_size(rgb.shape[1], rgb.shape[0], c.vit_image_max, c.vit_image_min, c.vit.patch_size)
        vit = image_to_tensor(resize_image(rgb, vw, vh))
        # The edit source is painted over at the output size.
        vae = None if size is None else image_to_tensor(resize_image(rgb, size[0], size[1]))
        out.append(PreparedImage(vit=vit, vae=vae))
    return tuple(out)


def _part_lens(
    cfg: BagelConfig, tokenizer: TextTokenizer, parts: list[Part], images: tuple[PreparedImage, ...]
) -> list[int]:
    """Context positions of each part: a text between its markers; an image's ViT tokens between
    markers, and when painting its VAE latents between markers too."""
    c = cfg
    out = []
    for part in parts:
        if part.kind == "text":
            n = len(tokenizer.encode(part.text)) + 2
        else:
            img = images[part.image]
            _, vh, vw = img.vit.shape
            n = (vh // c.vit.patch_size) * (vw // c.vit.patch_size) + 2
            if img.vae is not None:
                _, h, w = img.vae.shape
                n += (h // c.latent_downsample) * (w // c.latent_downsample) + 2
        out.append(n)
    return out


def _check_length(
    cfg: BagelConfig, max_len: int, context_len: int, size: tuple[int, int] | None, *, think: bool
) -> None:
    need = context_len
    if size is not None:
        w, h = size
        need += (w // cfg.latent_downsample) * (h // cfg.latent_downsample) + 2
        if think:
            need += 8  # room for at least a short plan
    else:
        need += 2
    if need > max_len:
        raise InvalidRequestError(
            f"the request needs {need} context positions; this engine holds {max_len} per request",
            param="text",
        )


def decode_on_white(item: MediaItem) -> np.ndarray:
    """Decode to RGB; transparent images are pasted on white through their alpha, as the reference does."""
    return decode_image(item, background=(255, 255, 255))


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
