"""Turning media arguments into named byte blobs, and decoding them.

The Engine, the server and the client accept media as a path, raw bytes, a
``(filename, bytes)`` tuple, or a list of those. ``normalize_media`` turns any
of these into :class:`MediaItem`. The ``decode_*`` helpers turn bytes into
arrays (numpy; no torch) and raise :class:`~mstar.errors.MediaError` naming
the problem when the bytes are not what they claim to be.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar.errors import MediaError
from mstar.sniff import sniff_extension

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MediaArg",
    "MediaItem",
    "accepted_format",
    "decode_audio",
    "decode_image",
    "decode_video",
    "modality_for_filename",
    "normalize_media",
]

#: Accepted file extensions per modality; the first is the modality's default (unrecognised raw bytes).
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"),
    "audio": (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac"),
    "video": (".mp4", ".webm", ".mov", ".mkv", ".avi"),
}
# Guard against decompression bombs: a tiny file that claims gigapixel size.
MAX_IMAGE_PIXELS = 40_000_000
MAX_VIDEO_FRAMES = 4096
# Decoded RGB frames are held in memory: cap their total size, not just their count.
MAX_VIDEO_BYTES = 768 * 1024 * 1024

MediaArg = str | os.PathLike[str] | bytes | tuple[str, bytes]

# What each modality is decoded with, keyed by the extension mstar.sniff finds in the bytes (never the
# file name, never FFmpeg's or Pillow's own probing: both would pick any decoder they have). FFmpeg
# demuxers are only those that read nothing but the bytes they are given: concat, hls, image2, subfile,
# tee and the other playlist or multi-file demuxers open files or URLs named inside the data, so a
# "clip.mp3" holding "ffconcat ... file 'secret.wav'" would read the server's files. Pillow is limited
# to the five formats we document: its other plugins (TIFF, PCX, ICO, EPS via Ghostscript...) stay out.
AUDIO_DEMUXERS: dict[str, str] = {
    ".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".ogg": "ogg", ".aac": "aac",
    ".m4a": "mov", ".mp4": "mov", ".mov": "mov", ".webm": "matroska", ".mkv": "matroska",
}
VIDEO_DEMUXERS: dict[str, str] = {
    ".mp4": "mov", ".mov": "mov", ".webm": "matroska", ".mkv": "matroska", ".avi": "avi",
}
IMAGE_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}
_ACCEPTED: dict[str, tuple[dict[str, str], str]] = {
    "image": (IMAGE_FORMATS, "PNG, JPEG, WebP, GIF or BMP image"),
    "audio": (AUDIO_DEMUXERS, "WAV, FLAC, MP3, Ogg (Vorbis/Opus), AAC (ADTS), M4A/MP4/MOV or WebM/Matroska audio file"),
    "video": (VIDEO_DEMUXERS, "MP4/MOV, WebM/Matroska or AVI video file"),
}
# Demuxer options, belt and braces: no protocol may be opened besides the in-memory buffer (a demuxer
# that tried to open a second input gets nothing), and MP4/MOV data references to other files stay off.
_NO_PROTOCOLS = {"protocol_whitelist": "none"}
_DEMUXER_OPTIONS: dict[str, dict[str, str]] = {"mov": {"enable_drefs": "0", "use_absolute_path": "0"}}
# Sniffed formats libsndfile decodes first (it reads the buffer only and opens nothing else).
_SOUNDFILE_FORMATS = (".wav", ".flac", ".ogg")


@dataclass(frozen=True, slots=True)
class MediaItem:
    """One media input: its filename (for the format hint), bytes and modality."""

    name: str
    data: bytes
    modality: str


def modality_for_filename(name: str) -> str | None:
    ext = os.path.splitext(name.lower())[1]
    for modality, exts in EXTENSIONS.items():
        if ext in exts:
            return modality
    return None


def _one(arg: Any, modality: str) -> MediaItem:
    if isinstance(arg, MediaItem):
        return arg
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return MediaItem(f"{modality}.bin", bytes(arg), modality)
    if isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[0], str) and isinstance(arg[1], (bytes, bytearray)):
        return MediaItem(arg[0], bytes(arg[1]), modality)
    if isinstance(arg, (str, os.PathLike)):
        path = Path(arg)
        if not path.is_file():
            raise MediaError(f"{modality} file not found: {str(path)!r}", param=modality)
        return MediaItem(path.name, path.read_bytes(), modality)
    raise MediaError(
        f"{modality} must be a path, bytes, a (filename, bytes) tuple or a list of those; got {type(arg).__name__}",
        param=modality,
    )


def normalize_media(arg: MediaArg | list[MediaArg] | None, modality: str) -> list[MediaItem]:
    """Accept every documented form of a media argument and return a list of items."""
    if arg is None:
        return []
    items = arg if isinstance(arg, list) else [arg]
    return [_one(a, modality) for a in items]


# --------------------------------------------------------------------------- decoding


def accepted_format(data: bytes, modality: str, name: str) -> str:
    """The extension ``data`` sniffs as, if it is a format accepted for ``modality``; else a MediaError.

    ``name`` is what the client called the media (its file name or field): the error names it and the
    accepted formats, and says nothing of what the bytes look like to FFmpeg or Pillow.
    """
    table, accepted = _ACCEPTED[modality]
    ext = sniff_extension(data, modality)
    if ext is None or ext not in table:
        raise MediaError(f"{modality} {name!r} could not be decoded: it is not a {accepted}", param=modality)
    return ext


def _open_av(item: MediaItem, demuxers: dict[str, str]) -> Any:
    """A PyAV input container on the item's bytes, with the demuxer its sniffed format names."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a core dependency
        raise MediaError(f"{item.modality} decoding needs PyAV (pip install av)") from exc

    fmt = demuxers[accepted_format(item.data, item.modality, item.name)]
    options = {**_NO_PROTOCOLS, **_DEMUXER_OPTIONS.get(fmt, {})}
    return av.open(io.BytesIO(item.data), mode="r", format=fmt, container_options=options)


def _av_reason(exc: Exception) -> str:
    # FFmpeg errors carry the "file name" ('<none>' for a buffer) and errno text; keep only the reason.
    reason = getattr(exc, "strerror", None)
    return str(reason) if reason else type(exc).__name__


def decode_image(item: MediaItem, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode to an RGB uint8 array of shape [H, W, 3]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    fmt = IMAGE_FORMATS[accepted_format(item.data, "image", item.name)]
    try:
        # Only the plugin the sniffer named may open it: Pillow would otherwise try each of its plugins.
        with Image.open(io.BytesIO(item.data), formats=[fmt]) as img:
            w, h = img.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                raise MediaError(f"image {item.name!r} is {w}x{h}; at most {max_pixels} pixels are accepted", param="image")
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image {item.name!r} is too large: at most {max_pixels} pixels are accepted", param="image") from exc
    except UnidentifiedImageError as exc:
        raise MediaError(f"image {item.name!r} could not be decoded: it is not a valid {fmt} image", param="image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"image {item.name!r} could not be decoded: {exc}", param="image") from exc


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    import numpy as np

    if sr == target or x.size == 0:
        return x.astype(np.float32)
    n_out = int(round(x.shape[0] * target / sr))
    # Linear interpolation after a crude box low-pass: adequate for speech models' 16 kHz input.
    if target < sr:
        k = max(1, int(sr // target))
        if k > 1:
            kernel = np.ones(k, dtype=np.float32) / k
            x = np.convolve(x, kernel, mode="same")
    t_in = np.arange(x.shape[0], dtype=np.float64) / sr
    t_out = np.arange(n_out, dtype=np.float64) / target
    return np.interp(t_out, t_in, x).astype(np.float32)


def decode_audio(item: MediaItem, *, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Decode to mono float32 in [-1, 1]; resample to ``sample_rate`` when given."""
    import numpy as np

    ext = accepted_format(item.data, "audio", item.name)  # refuses playlists, text and unknown bytes first
    audio: np.ndarray | None = None
    sr = 0
    if ext in _SOUNDFILE_FORMATS:
        try:
            import soundfile as sf

            data, sr = sf.read(io.BytesIO(item.data), dtype="float32", always_2d=True)
            audio = data.mean(axis=1)
        except Exception:
            audio = None  # e.g. a WAV codec libsndfile lacks: FFmpeg may still read it
    if audio is None:
        try:
            import av

            container: Any = _open_av(item, AUDIO_DEMUXERS)
            with container:
                stream: Any = next(iter(container.streams.audio), None)
                if stream is None:
                    raise MediaError(f"audio {item.name!r} has no audio stream", param="audio")
                resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate or 16000)
                parts = []
                for frame in container.decode(stream):
                    for out in resampler.resample(frame):
                        parts.append(out.to_ndarray().reshape(-1))
                sr = int(stream.rate or 16000)
                audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        except MediaError:
            raise
        except Exception as exc:
            raise MediaError(f"audio {item.name!r} could not be decoded: {_av_reason(exc)}", param="audio") from exc
    if audio.size == 0:
        raise MediaError(f"audio {item.name!r} holds no samples", param="audio")
    if sample_rate is not None:
        audio = _resample(audio, sr, sample_rate)
        sr = sample_rate
    return audio.astype(np.float32), sr


def decode_video(item: MediaItem, *, max_frames: int = MAX_VIDEO_FRAMES) -> tuple[np.ndarray, float]:
    """Decode to RGB uint8 frames [T, H, W, 3] and the frame rate (PyAV; no torchvision)."""
    import numpy as np

    try:
        container: Any = _open_av(item, VIDEO_DEMUXERS)
        with container:
            stream: Any = next(iter(container.streams.video), None)
            if stream is None:
                raise MediaError(f"video {item.name!r} has no video stream", param="video")
            fps = float(stream.average_rate or 25)
            frames = []
            total = 0
            frame: Any
            for frame in container.decode(stream):
                if frame.width * frame.height > MAX_IMAGE_PIXELS:
                    raise MediaError(f"video {item.name!r} frames are {frame.width}x{frame.height}: too large", param="video")
                total += frame.width * frame.height * 3
                if total > MAX_VIDEO_BYTES:
                    raise MediaError(
                        f"video {item.name!r} decodes to more than {MAX_VIDEO_BYTES // 2**20} MiB of frames; send a shorter or smaller clip",
                        param="video",
                    )
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"video {item.name!r} could not be decoded: {_av_reason(exc)}", param="video") from exc
    if not frames:
        raise MediaError(f"video {item.name!r} holds no frames", param="video")
    return np.stack(frames), fps
