"""Small media files for the tests: valid ones, and the named bad-media recipes the corpora refer to."""

from __future__ import annotations

import io
from typing import Any

__all__ = ["make_mp4", "make_mp4_with_audio", "make_png", "make_wav", "media_recipe", "png_bytes"]


def png_bytes(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A flat ``width x height`` PNG of one colour."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def make_png(w: int = 16, h: int = 16, value: int = 90) -> bytes:
    """A small valid RGB PNG."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_wav(seconds: float = 0.25, sr: int = 16000) -> bytes:
    """A short mono 16-bit sine WAV."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_mp4(frames: int = 4, w: int = 32, h: int = 32, *, fmt: str = "mp4", codec: str = "mpeg4") -> bytes:
    """A tiny clip (PyAV): MPEG-4 in MP4 by default, or ``codec`` in container ``fmt``."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream: Any = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 30 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_mp4_with_audio(frames: int = 4, size: int = 64, fps: int = 2, *, seconds: float | None = None) -> bytes:
    """An MP4 of random ``size x size`` frames (MPEG-4) and a 16 kHz mono AAC track of a 330 Hz tone.

    The track lasts ``seconds`` (default: as long as the frames).
    """
    import av
    import numpy as np

    sr = 16000
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        video: Any = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size, size, "yuv420p"
        audio: Any = container.add_stream("aac", rate=sr)
        audio.layout = "mono"
        rng = np.random.default_rng(3)
        for _ in range(frames):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        t = np.arange(int(sr * (frames / fps if seconds is None else seconds))) / sr
        wave = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
        for start in range(0, len(wave), 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="flt", layout="mono")
            frame.sample_rate = sr
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return buf.getvalue()


# --------------------------------------------------------------------------- bad media recipes (named in the corpus)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but whose data is a few bytes (a decompression bomb's shape)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


def _jpeg(w: int = 16, h: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG with its SOF0 frame size patched to ``width x height``."""
    import struct

    data = bytearray(_jpeg())
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    import struct

    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


def _wav_header(channels: int = 1, rate: int = 16000, bits: int = 16, data_len: int = 32000) -> bytes:
    import struct

    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return b"RIFF" + struct.pack("<I", 36 + data_len) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_len)


def _corrupt(data: bytes, at: float, n: int = 64) -> bytes:
    i = int(len(data) * at)
    return data[:i] + bytes((b ^ 0xA5) for b in data[i:i + n]) + data[i + n:]


def media_recipe(name: str) -> bytes:
    """The bytes of a named bad (or good) media file; the corpus refers to these names."""
    png, wav, mp4, jpg = make_png(), make_wav(), make_mp4(), _jpeg()
    recipes: dict[str, Any] = {
        "png_ok": lambda: png,
        "wav_ok": lambda: wav,
        "mp4_ok": lambda: mp4,
        "jpeg_ok": lambda: jpg,
        "png_truncated": lambda: png[: len(png) // 2],
        "png_signature_only": lambda: png[:8],
        "png_corrupt_idat": lambda: _corrupt(png, 0.6, 12),
        "png_bomb_100k_square": lambda: _png_claiming(100_000, 100_000),
        "png_bomb_wide_strip": lambda: _png_claiming(2_000_000_000, 1),
        "png_zero_size": lambda: _png_claiming(0, 0),
        "gif_bomb_65535": lambda: _gif_claiming(65535, 65535),
        "jpeg_truncated": lambda: jpg[: len(jpg) // 2],
        "jpeg_garbage": lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "jpeg_bomb_65500": lambda: _jpeg_claiming(65500, 65500),
        "wav_header_only": lambda: _wav_header(),
        "wav_zero_channels": lambda: _wav_header(channels=0) + b"\x00" * 64,
        "wav_zero_rate": lambda: _wav_header(rate=0) + b"\x00" * 64,
        "wav_bad_riff": lambda: b"RIFF\xff\xff\xff\xffWAVEjunk" + bytes(200),
        "mp4_truncated": lambda: mp4[: len(mp4) // 3],
        "mp4_garbage": lambda: b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 3,
        "mp4_corrupt_middle": lambda: _corrupt(mp4, 0.5, 200),
        "text_bytes": lambda: b"this is plain text, not media\n" * 4,
        "nul_bytes": lambda: b"\x00" * 512,
        "empty": lambda: b"",
    }
    if name not in recipes:
        raise KeyError(f"unknown media recipe {name!r}")
    data: bytes = recipes[name]()
    return data
