"""Turning decoded media into encoder inputs: log-mel features, image and video patches.

No torchvision: images are resized with PIL (bicubic) to a multiple of
``patch_size * merge_size`` within a pixel budget, scaled to [-1, 1] and cut
into flattened ``temporal x patch x patch`` patches ordered so that each
``merge x merge`` block is contiguous (the layout the vision tower's merger
expects). Audio uses Whisper's log-mel front end (128 bins, 16 kHz, hop 160).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "AUDIO_MIN_SAMPLES",
    "AudioFeatures",
    "ImagePrep",
    "VisualPatches",
    "audio_features",
    "audio_token_count",
    "image_patches",
    "smart_resize",
    "video_patches",
]

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 12845056  # the published preprocessor_config.json's max_pixels
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32
VIDEO_FPS = 2.0
VIDEO_MAX_FRAMES = 128
# Whisper's front end pads each side of the clip by reflection with n_fft // 2 = 200 samples, which
# needs more samples than that: the shortest clip it can read is 201 samples at 16 kHz.
AUDIO_MIN_SAMPLES = 400 // 2 + 1


@dataclass(frozen=True, slots=True)
class ImagePrep:
    """Normalisation and pixel budget for images (the checkpoint's preprocessor_config.json when it has one)."""

    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD
    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path | None) -> ImagePrep:
        path = checkpoint_dir / "preprocessor_config.json" if checkpoint_dir is not None else None
        if path is None or not path.is_file():
            return cls()
        doc = json.loads(path.read_text())
        return cls(
            mean=tuple(doc.get("image_mean", IMAGE_MEAN)),  # type: ignore[arg-type]
            std=tuple(doc.get("image_std", IMAGE_STD)),  # type: ignore[arg-type]
            min_pixels=int(doc.get("min_pixels", IMAGE_MIN_PIXELS)),
            max_pixels=int(doc.get("max_pixels", IMAGE_MAX_PIXELS)),
        )


@dataclass(slots=True)
class AudioFeatures:
    mel: torch.Tensor  # [128, frames]
    num_tokens: int


@dataclass(slots=True)
class VisualPatches:
    pixels: torch.Tensor  # [grid_t * grid_h * grid_w, C * temporal * patch * patch]
    grid_thw: tuple[int, int, int]
    second_per_grid: float
    num_tokens: int


def audio_token_count(mel_frames: int, n_window: int = 50) -> int:
    """Tokens the audio tower emits for ``mel_frames`` frames (chunks of 2 * n_window frames give 13 each)."""
    chunk = n_window * 2
    rest = mel_frames % chunk
    feat = (rest - 1) // 2 + 1
    return int(((feat - 1) // 2 + 1 - 1) // 2 + 1 + (mel_frames // chunk) * 13)


_EXTRACTOR: Any = None


def audio_features(wave: np.ndarray, *, n_window: int = 50) -> AudioFeatures:
    """Whisper-style log-mel features of 16 kHz mono ``wave`` (at least :data:`AUDIO_MIN_SAMPLES` long)."""
    global _EXTRACTOR
    if wave.shape[0] < AUDIO_MIN_SAMPLES:
        from mstar.errors import MediaError

        raise MediaError(
            f"audio is {wave.shape[0] / 16:.1f} ms long ({wave.shape[0]} samples at 16 kHz); Qwen3-Omni needs at "
            f"least {AUDIO_MIN_SAMPLES / 16:.1f} ms ({AUDIO_MIN_SAMPLES} samples at 16 kHz)",
            param="audio",
        )
    if _EXTRACTOR is None:
        from transformers import WhisperFeatureExtractor

        _EXTRACTOR = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)
    out = _EXTRACTOR(
        wave, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True, return_tensors="np"
    )
    frames = int(out["attention_mask"][0].sum())
    mel = torch.from_numpy(np.ascontiguousarray(out["input_features"][0][:, :frames])).float()
    return AudioFeatures(mel, audio_token_count(frames, n_window))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest size with both sides multiples of ``factor`` and area within [min_pixels, max_pixels]."""
    if max(height, width) / max(1, min(height, width)) > 200:
        from mstar.errors import MediaError

        raise MediaError(f"image aspect ratio {width}x{height} is too extreme (at most 200:1)", param="image")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _resize_normalise(frame: np.ndarray, h: int, w: int, prep: ImagePrep) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(frame)
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    # In place on the one float copy (at the model's input size, never the original's): same values.
    normed = np.asarray(img, dtype=np.float32)
    normed /= np.float32(255.0)
    normed -= np.array(prep.mean, np.float32)
    normed /= np.array(prep.std, np.float32)
    return normed.transpose(2, 0, 1)  # [C, H, W]


def _patchify(frames: np.ndarray, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] -> ([grid_t*grid_h*grid_w, C*temporal*patch*patch], grid)."""
    if frames.shape[0] % temporal:
        pad = temporal - frames.shape[0] % temporal
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = x.reshape(gt * gh * gw, c * temporal * patch * patch)
    return torch.from_numpy(np.ascontiguousarray(flat)), (gt, gh, gw)


def image_patches(
    image: np.ndarray, *, patch: int = 16, merge: int = 2, temporal: int = 2, prep: ImagePrep | None = None
) -> VisualPatches:
    """Patches of one RGB uint8 image [H, W, 3] (repeated ``temporal`` times, as the vision tower expects)."""
    prep = prep or ImagePrep()
    h, w = smart_resize(image.shape[0], image.shape[1], patch * merge, prep.min_pixels, prep.max_pixels)
    arr = _resize_normalise(image, h, w, prep)[None]
    pixels, grid = _patchify(np.repeat(arr, temporal, axis=0), patch, merge, temporal)
    return VisualPatches(pixels, grid, 0.0, grid[0] * grid[1] * grid[2] // merge**2)


def video_patches(
    frames: np.ndarray, fps: float, *, patch: int = 16, merge: int = 2, temporal: int = 2, prep: ImagePrep | None = None
) -> VisualPatches:
    """Patches of RGB uint8 frames [T, H, W, 3] sampled at ``VIDEO_FPS`` (at most ``VIDEO_MAX_FRAMES``)."""
    total = frames.shape[0]
    duration = total / max(fps, 1e-3)
    n = int(min(VIDEO_MAX_FRAMES, max(temporal, round(duration * VIDEO_FPS))))
    n = max(temporal, n - n % temporal)
    idx = np.linspace(0, total - 1, n).round().astype(int)
    sampled_fps = n / duration if duration > 0 else VIDEO_FPS
    h, w = smart_resize(frames.shape[1], frames.shape[2], patch * merge, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    prep = prep or ImagePrep()
    arr = np.stack([_resize_normalise(frames[i], h, w, prep) for i in idx])
    pixels, grid = _patchify(arr, patch, merge, temporal)
    return VisualPatches(pixels, grid, temporal / sampled_fps, grid[0] * grid[1] * grid[2] // merge**2)
