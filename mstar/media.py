"""Turning media arguments into named byte blobs, and decoding them.

The Engine, the server and the client accept media as a path, raw bytes, a
``(filename, bytes)`` tuple, or a list of those. ``normalize_media`` turns any
of these into :class:`MediaItem`. The ``decode_*`` helpers turn bytes into
arrays (numpy; no torch) and raise :class:`~mstar.errors.MediaError` naming
the problem when the bytes are not what they claim to be.

Each item carries the :class:`~mstar.media_limits.MediaLimits` it is decoded
under (the Engine's, set by ``normalize_media``): the decoders check them from
the header before decoding and again while decoding, and raise
:class:`~mstar.errors.MediaTooLargeError` (413) at the first cap passed.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar.errors import MediaError, MediaTooLargeError
from mstar.media_limits import DEFAULT_LIMITS, MediaLimits
from mstar.sniff import sniff_extension

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "EXTENSIONS",
    "MAX_SAMPLE_RATE",
    "MediaArg",
    "MediaItem",
    "MediaLimits",
    "accepted_format",
    "decode_audio",
    "decode_audio_track",
    "decode_image",
    "decode_video",
    "modality_for_filename",
    "normalize_media",
    "with_limits",
]

#: Accepted file extensions per modality; the first is the modality's default (unrecognised raw bytes).
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"),
    "audio": (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac"),
    "video": (".mp4", ".webm", ".mov", ".mkv", ".avi"),
}
#: The highest audio sample rate decoded (DXD's 352.8 kHz and 384 kHz are the highest in use). Not a
#: configurable cap: it bounds the CPU of the resampler's low-pass filter, whose length grows with the rate.
MAX_SAMPLE_RATE = 384_000
# Decoded samples are read in blocks of this many bytes (all channels) and mixed down to mono at once.
_AUDIO_BLOCK_BYTES = 4 * 1024 * 1024
# libsndfile reports a length the header leaves unknown (a FLAC STREAMINFO of 0 samples) as SF_COUNT_MAX.
_SF_UNKNOWN_FRAMES = 1 << 62

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
    """One media input: its filename (for the format hint), bytes and modality, and the caps it is decoded under."""

    name: str
    data: bytes
    modality: str
    limits: MediaLimits = field(default=DEFAULT_LIMITS, repr=False, compare=False)


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


def normalize_media(
    arg: MediaArg | list[MediaArg] | None, modality: str, *, limits: MediaLimits | None = None
) -> list[MediaItem]:
    """Accept every documented form of a media argument and return a list of items.

    ``limits`` (the Engine's) replaces the caps of every item, including items passed in as ``MediaItem``.
    """
    if arg is None:
        return []
    items = [_one(a, modality) for a in (arg if isinstance(arg, list) else [arg])]
    return items if limits is None else with_limits(items, limits)


def with_limits(items: list[MediaItem], limits: MediaLimits) -> list[MediaItem]:
    """``items`` to be decoded under ``limits``."""
    return [item if item.limits is limits else replace(item, limits=limits) for item in items]


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


def decode_image(
    item: MediaItem, *, limits: MediaLimits | None = None, background: tuple[int, int, int] | None = None
) -> np.ndarray:
    """Decode to an RGB uint8 array of shape [H, W, 3].

    The size comes from the header, checked against ``limits`` (default: the item's) before any pixel
    is decoded; Pillow then decodes exactly that many. With ``background``, transparent pixels are
    composited onto that colour (in uint8, as Pillow pastes through the alpha mask); without, alpha is
    dropped.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    limits = limits or item.limits
    what = f"image {item.name!r}"
    fmt = IMAGE_FORMATS[accepted_format(item.data, "image", item.name)]
    try:
        # Only the plugin the sniffer named may open it: Pillow would otherwise try each of its plugins.
        with Image.open(io.BytesIO(item.data), formats=[fmt]) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise MediaError(f"{what} is {w}x{h}: it has no pixels", param="image")
            limits.check_pixels(what, w, h)
            limits.check_bytes(what, w * h * 4)  # Pillow holds every mode we decode in at most 4 bytes a pixel
            img.load()
            rgb = _flatten(img, background)
            if rgb is not img:
                img.close()  # free the decoded original before the array copy
            return np.array(rgb, dtype=np.uint8)
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard fires in open(), on the header alone
        raise MediaTooLargeError(
            f"{what} is over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels; the limit is {limits.max_image_pixels} "
            "pixels (--max-image-pixels)",
            param="image",
        ) from exc
    except UnidentifiedImageError as exc:
        raise MediaError(f"{what} could not be decoded: it is not a valid {fmt} image", param="image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{what} could not be decoded: {exc}", param="image") from exc


def _flatten(img: Any, background: tuple[int, int, int] | None) -> Any:
    """``img`` as a Pillow RGB image, its alpha composited onto ``background`` when given."""
    from PIL import Image

    transparent = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if background is None or not transparent:
        return img if img.mode == "RGB" else img.convert("RGB")
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    import numpy as np

    if sr == target or x.size == 0:
        return x.astype(np.float32, copy=False)
    n_out = int(round(x.shape[0] * target / sr))
    # Linear interpolation after a crude box low-pass: adequate for speech models' 16 kHz input.
    if target < sr:
        k = max(1, int(sr // target))
        if k > 1:
            kernel = np.ones(k, dtype=np.float32) / k
            x = np.convolve(x, kernel, mode="same")
    # In chunks of output samples, each with the stretch of input times it spans: the same values as one
    # np.interp over the whole clip, without float64 time axes as long as the clip at both rates.
    out = np.empty(n_out, np.float32)
    step = 1 << 20
    for i0 in range(0, n_out, step):
        t_out = np.arange(i0, min(n_out, i0 + step), dtype=np.float64) / target
        j0 = max(0, int(t_out[0] * sr) - 1)
        j1 = min(x.shape[0], int(t_out[-1] * sr) + 2)
        t_in = np.arange(j0, j1, dtype=np.float64) / sr
        out[i0 : i0 + t_out.shape[0]] = np.interp(t_out, t_in, x[j0:j1])
    return out


def decode_audio(
    item: MediaItem, *, sample_rate: int | None = None, limits: MediaLimits | None = None
) -> tuple[np.ndarray, int]:
    """Decode to mono float32 in [-1, 1]; resample to ``sample_rate`` when given.

    The duration in the header (when it gives one) is checked against ``limits`` (default: the item's)
    before decoding; while decoding, the samples are counted and decoding stops at the first cap passed.
    Channels are mixed down block by block, so only mono samples are held.
    """
    import numpy as np

    limits = limits or item.limits
    ext = accepted_format(item.data, "audio", item.name)  # refuses playlists, text and unknown bytes first
    audio: np.ndarray | None = None
    sr = 0
    if ext in _SOUNDFILE_FORMATS:
        try:
            audio, sr = _soundfile_audio(item, limits)
        except MediaError:
            raise
        except Exception:
            audio = None  # e.g. a WAV codec libsndfile lacks: FFmpeg may still read it
    if audio is None:
        audio, sr = _av_audio(item, limits, AUDIO_DEMUXERS, what=f"audio {item.name!r}")
    if audio.size == 0:
        raise MediaError(f"audio {item.name!r} holds no samples", param="audio")
    if sample_rate is not None:
        audio = _resample(audio, sr, sample_rate)
        sr = sample_rate
    return audio.astype(np.float32, copy=False), sr


class _SampleCount:
    """Counts one clip's decoded samples against the caps (the header may have lied or said nothing)."""

    __slots__ = ("limits", "n", "sr", "what")

    def __init__(self, what: str, sr: int, limits: MediaLimits) -> None:
        if not 0 < sr <= MAX_SAMPLE_RATE:
            raise MediaError(f"{what} has a sample rate of {sr} Hz; mstar reads 1 to {MAX_SAMPLE_RATE} Hz", param="audio")
        self.what, self.sr, self.limits, self.n = what, sr, limits, 0

    def header(self, seconds: float | None) -> None:
        if seconds is not None and seconds > 0:
            self.limits.check_seconds(self.what, seconds)
            self.limits.check_bytes(self.what, int(seconds * self.sr) * 4)

    def add(self, samples: int) -> None:
        self.n += samples
        self.limits.check_seconds(self.what, self.n / self.sr, at_least=True)
        self.limits.check_bytes(self.what, self.n * 4, at_least=True)


def _soundfile_audio(item: MediaItem, limits: MediaLimits) -> tuple[np.ndarray, int]:
    import numpy as np
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(item.data)) as f:
        count = _SampleCount(f"audio {item.name!r}", int(f.samplerate), limits)
        count.header(f.frames / f.samplerate if 0 < f.frames < _SF_UNKNOWN_FRAMES else None)
        block = max(1, _AUDIO_BLOCK_BYTES // (4 * max(1, f.channels)))
        parts = []
        while True:
            data = f.read(block, dtype="float32", always_2d=True)
            if data.shape[0] == 0:
                break
            count.add(data.shape[0])
            parts.append(data.mean(axis=1))
        return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), count.sr


def decode_audio_track(
    item: MediaItem, *, sample_rate: int | None = None, limits: MediaLimits | None = None
) -> tuple[np.ndarray, int] | None:
    """A video's sound as :func:`decode_audio` gives it (mono float32, resampled to ``sample_rate`` when
    given, under the audio caps), or None when the video has no audio stream or it holds no samples."""
    try:
        audio, sr = _av_audio(item, limits or item.limits, VIDEO_DEMUXERS, what=f"audio track of video {item.name!r}")
    except _NoAudioStream:
        return None
    if audio.size == 0:
        return None
    if sample_rate is not None:
        audio, sr = _resample(audio, sr, sample_rate), sample_rate
    return audio, sr


class _NoAudioStream(MediaError):
    """The container holds no audio stream (an error for an audio input; silence for a video's track)."""


def _av_audio(item: MediaItem, limits: MediaLimits, demuxers: dict[str, str], *, what: str) -> tuple[np.ndarray, int]:
    """The first audio stream of ``item`` as mono float32 at its own rate."""
    import numpy as np

    try:
        import av

        container: Any = _open_av(item, demuxers)
        with container:
            stream: Any = next(iter(container.streams.audio), None)
            if stream is None:
                raise _NoAudioStream(f"{what} has no audio stream", param="audio")
            count = _SampleCount(what, int(stream.rate or 16000), limits)
            count.header(_av_seconds(container, stream))
            resampler = av.AudioResampler(format="flt", layout="mono", rate=count.sr)
            parts = []
            for frame in container.decode(stream):
                count.add(frame.samples)
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), count.sr
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"{what} could not be decoded: {_av_reason(exc)}", param=item.modality) from exc


def _av_seconds(container: Any, stream: Any) -> float | None:
    """The duration a PyAV stream's header (else its container's) states, or None when neither does."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE
    return None


def decode_video(
    item: MediaItem, *, max_frames: int | None = None, limits: MediaLimits | None = None
) -> tuple[np.ndarray, float]:
    """Decode to RGB uint8 frames [T, H, W, 3] and the frame rate (PyAV; no torchvision).

    ``max_frames``: stop after that many frames (for a caller that uses no more). Frame size, frame
    count and duration from the header are checked against ``limits`` (default: the item's) before
    decoding; while decoding, frames, their timestamps and their bytes are counted and decoding stops
    at the first cap passed. Frames go straight into one array sized from the header, so the clip is
    held once.
    """
    import numpy as np

    limits = limits or item.limits
    what = f"video {item.name!r}"
    try:
        container: Any = _open_av(item, VIDEO_DEMUXERS)
        with container:
            stream: Any = next(iter(container.streams.video), None)
            if stream is None:
                raise MediaError(f"{what} has no video stream", param="video")
            fps = float(stream.average_rate or 25)
            w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            if w > 0 and h > 0:
                limits.check_pixels(f"{what} frame", w, h)
            stated = int(stream.frames or 0)
            if stated > 0:
                limits.check_frames(what, stated)
                if w > 0 and h > 0:
                    limits.check_bytes(what, stated * w * h * 3)
            seconds = _av_seconds(container, stream)
            if seconds is not None:
                limits.check_seconds(what, seconds)
            frames, n = None, 0
            frame: Any
            for frame in container.decode(stream):
                shape = (frame.height, frame.width, 3)
                if frames is None:
                    limits.check_pixels(f"{what} frame", frame.width, frame.height)
                    first = min(stated or 64, limits.max_video_frames, max_frames or stated or 64)
                    frames = np.empty((max(1, first), *shape), np.uint8)
                elif frames.shape[1:] != shape:
                    raise MediaError(
                        f"{what} changes frame size from {frames.shape[2]}x{frames.shape[1]} to "
                        f"{frame.width}x{frame.height}; mstar reads clips of one frame size",
                        param="video",
                    )
                limits.check_frames(what, n + 1, at_least=True)
                limits.check_bytes(what, (n + 1) * frames[0].nbytes, at_least=True)
                if frame.time is not None:
                    limits.check_seconds(what, float(frame.time), at_least=True)
                if n == frames.shape[0]:  # the header said fewer frames (or nothing): grow, within the caps
                    room = min(limits.max_video_frames, limits.max_decoded_bytes // frames[0].nbytes)
                    frames.resize((max(n + 1, min(2 * n, room)), *shape), refcheck=False)
                frames[n] = frame.to_ndarray(format="rgb24")
                n += 1
                if max_frames is not None and n >= max_frames:
                    break
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"{what} could not be decoded: {_av_reason(exc)}", param="video") from exc
    if frames is None or n == 0:
        raise MediaError(f"{what} holds no frames", param="video")
    if n < frames.shape[0]:
        frames.resize((n, *frames.shape[1:]), refcheck=False)
    return frames, fps
