"""The caps on decoded media: how many pixels, seconds, frames and bytes one input may decode to.

Upload size says nothing about memory: a 217 KiB FLAC holds 20 minutes of silence, a 165 KiB PNG
a 6300x6300 flat RGBA image. So every decoder in :mod:`mstar.media` checks these caps twice: from
the container's header before decoding anything, and again while decoding, counting what it has
produced, since a header may lie or say nothing. Going over a cap raises
:class:`~mstar.errors.MediaTooLargeError` (HTTP 413) naming the cap, the client's value and the
``mstar-server`` flag that raises it.

The defaults fit what the served models consume: Qwen3-Omni resizes images to at most 12.8 MP and
samples at most 128 video frames; BAGEL reads images at 980 px (ViT) and 1024 px (VAE); Pi0.5 at
224 px; V-JEPA 2 encodes at most 512 frames at 256-384 px. Engine users get the same defaults
(``Engine(..., media_limits=MediaLimits(...))`` changes them). Torch- and numpy-free: the server's
CLI builds one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mstar.errors import InvalidParameterError, MediaTooLargeError

__all__ = ["DEFAULT_LIMITS", "MediaLimits"]

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """Caps on what one media input may decode to (per image, per audio clip, per video).

    ==================  =======================  ============================================
    field               ``mstar-server`` flag    what it bounds
    ==================  =======================  ============================================
    max_image_pixels    ``--max-image-pixels``   width x height of an image or a video frame
    max_image_side      ``--max-image-side``     the longer side of an image or a video frame
    max_audio_seconds   ``--max-audio-seconds``  an audio clip's duration
    max_video_seconds   ``--max-video-seconds``  a video's duration
    max_video_frames    ``--max-video-frames``   frames in a video
    max_decoded_mb      ``--max-decoded-mb``     MiB an input decodes to: an image's pixels
                                                 at 4 bytes, an audio clip's mono float32
                                                 samples, a video's RGB frames
    ==================  =======================  ============================================
    """

    max_image_pixels: int = 4096 * 4096
    max_image_side: int = 16384
    max_audio_seconds: float = 300.0
    max_video_seconds: float = 600.0
    max_video_frames: int = 4096
    max_decoded_mb: float = 256.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidParameterError(f"media limit {f.name} must be a positive number, got {value!r}", param=f.name)

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * _MIB)

    # ---- the checks, each raising MediaTooLargeError naming the cap and the flag

    def check_pixels(self, what: str, width: int, height: int) -> None:
        """An image or a video frame of ``width x height``."""
        if max(width, height) > self.max_image_side:
            raise MediaTooLargeError(
                f"{what} is {width}x{height} pixels; the longest side may be {self.max_image_side} pixels "
                "(--max-image-side)",
                param=_param(what),
            )
        if width * height > self.max_image_pixels:
            raise MediaTooLargeError(
                f"{what} is {width}x{height} ({width * height} pixels); the limit is {self.max_image_pixels} pixels "
                "(--max-image-pixels)",
                param=_param(what),
            )

    def check_seconds(self, what: str, seconds: float, *, at_least: bool = False) -> None:
        """An audio clip (``what`` starts with "audio") or a video lasting ``seconds``.

        ``at_least``: the duration is a lower bound (decoding is under way), so the message says so.
        """
        limit, flag = (
            (self.max_audio_seconds, "--max-audio-seconds")
            if what.startswith("audio")
            else (self.max_video_seconds, "--max-video-seconds")
        )
        if seconds > limit:
            more = "at least " if at_least else ""
            raise MediaTooLargeError(
                f"{what} is {more}{seconds:.1f} s long; the limit is {limit:g} s ({flag})", param=_param(what)
            )

    def check_frames(self, what: str, frames: int, *, at_least: bool = False) -> None:
        if frames > self.max_video_frames:
            more = "at least " if at_least else ""
            raise MediaTooLargeError(
                f"{what} has {more}{frames} frames; the limit is {self.max_video_frames} frames (--max-video-frames)",
                param=_param(what),
            )

    def check_bytes(self, what: str, nbytes: int, *, at_least: bool = False) -> None:
        """``nbytes`` of decoded pixels or samples."""
        if nbytes > self.max_decoded_bytes:
            more = "at least " if at_least else ""
            raise MediaTooLargeError(
                f"{what} decodes to {more}{nbytes / _MIB:.1f} MiB; the limit is {self.max_decoded_mb:g} MiB "
                "(--max-decoded-mb): send a shorter or smaller file",
                param=_param(what),
            )


def _param(what: str) -> str:
    """The request field ``what`` came in: its first modality word ("audio track of video ..." is audio)."""
    return next((word for word in what.split() if word in ("image", "audio", "video")), "media")


#: The caps every Engine uses unless it is given others.
DEFAULT_LIMITS = MediaLimits()
