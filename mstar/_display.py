"""Short reprs and notebook HTML for the result types (torch-free, no IPython import).

Jupyter finds ``_repr_html_`` / ``_repr_png_`` by duck typing, so the types in
:mod:`mstar.types` only need to return strings and bytes; this module builds
them. Inline media is capped so a long utterance cannot make a notebook
unusable: audio beyond :data:`MAX_INLINE_AUDIO_SECONDS` is cut (the caption
says so), and images beyond :data:`MAX_INLINE_IMAGES` are counted, not shown.
"""

from __future__ import annotations

import base64
import html
import io
import wave
from collections.abc import Sequence

__all__ = [
    "MAX_INLINE_AUDIO_SECONDS",
    "MAX_INLINE_IMAGES",
    "MAX_INLINE_TEXT",
    "audio_html",
    "audio_summary",
    "image_html",
    "image_summary",
    "short",
    "size_text",
    "tensor_summary",
    "text_html",
    "wav_bytes",
]

#: Seconds of audio embedded in a notebook player (about 5.5 MB of 24 kHz mono WAV as base64).
MAX_INLINE_AUDIO_SECONDS = 120.0
#: Images embedded in one result's HTML; the rest are counted.
MAX_INLINE_IMAGES = 8
#: Characters of text shown in a result's HTML before it is cut.
MAX_INLINE_TEXT = 20_000


def short(text: str, limit: int = 40) -> str:
    """``repr(text)``, cut to about ``limit`` characters with the full length noted."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} chars)"


def size_text(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    if num_bytes < 1024 * 1024:
        return f"{num_bytes / 1024:.1f} KB"
    return f"{num_bytes / (1024 * 1024):.1f} MB"


def _channels(num_channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(num_channels, f"{num_channels} channels")


def audio_summary(num_samples: int, sample_rate: int, num_channels: int) -> str:
    """``1.80 s, 24000 Hz, mono`` for a stretch of PCM."""
    seconds = num_samples / sample_rate if sample_rate else 0.0
    return f"{seconds:.2f} s, {sample_rate} Hz, {_channels(num_channels)}"


def image_summary(png: bytes) -> str:
    """``png 64x48, 1.2 KB`` (or ``not a PNG, 12 B``)."""
    from mstar.sniff import PNG_MAGIC

    if png.startswith(PNG_MAGIC) and len(png) >= 24:
        w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        return f"png {w}x{h}, {size_text(len(png))}"
    return f"not a PNG, {size_text(len(png))}"


def tensor_summary(modality: str, dtype: str, shape: Sequence[int]) -> str:
    """``action float32[50, 32]``."""
    return f"{modality} {dtype}[{', '.join(str(s) for s in shape)}]"


def wav_bytes(pcm: bytes, sample_rate: int, num_channels: int) -> bytes:
    """A WAV file (RIFF header and int16 frames) holding ``pcm``."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(num_channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


def audio_html(pcm: bytes, sample_rate: int, num_channels: int) -> str:
    """An ``<audio controls>`` player holding the PCM as a base64 WAV, with a caption."""
    frame = 2 * max(num_channels, 1)
    total = len(pcm) // frame
    keep = min(total, int(MAX_INLINE_AUDIO_SECONDS * sample_rate)) if sample_rate > 0 else 0
    caption = html.escape(audio_summary(total, sample_rate, num_channels))
    if sample_rate <= 0:
        return f"<div><code>audio: {caption}</code> (no sample rate: cannot play)</div>"
    if keep < total:
        caption += f"; the player holds the first {MAX_INLINE_AUDIO_SECONDS:g} s (save it to hear it all)"
    data = base64.b64encode(wav_bytes(pcm[: keep * frame], sample_rate, num_channels)).decode("ascii")
    return (
        f'<div><audio controls preload="metadata" src="data:audio/wav;base64,{data}"></audio>'
        f"<br><small><code>{caption}</code></small></div>"
    )


def image_html(png: bytes, caption: str = "") -> str:
    """An ``<img>`` of the PNG bytes, with its size as the caption."""
    data = base64.b64encode(png).decode("ascii")
    label = html.escape(caption or image_summary(png))
    return (
        f'<figure style="display:inline-block;margin:4px"><img src="data:image/png;base64,{data}" '
        f'alt="{label}"><figcaption><small><code>{label}</code></small></figcaption></figure>'
    )


def text_html(text: str) -> str:
    """The text in a ``<pre>``, cut at :data:`MAX_INLINE_TEXT` characters."""
    shown = text[:MAX_INLINE_TEXT]
    more = f"\n… ({len(text) - len(shown)} more characters)" if len(shown) < len(text) else ""
    return f'<pre style="white-space:pre-wrap">{html.escape(shown + more)}</pre>'
