"""Helpers for the reliability tests (no tests here): shared tiny engines, in-process servers, a media-checking fake.

The soak harness itself lives in ``bench/soak.py``; the tests drive it with
in-process uvicorn servers on 127.0.0.1.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import tests.test_server_support  # noqa: F401  (registers "fake" and its OpenAI adapter)
from bench.soak import InProcessServer
from mstar.engine import Engine
from mstar.media import decode_audio, decode_image, decode_video
from mstar.models.params import Param
from mstar.registry import ModelInfo, register_model
from mstar.request import Request, RequestInputs
from mstar.server.adapters import register_adapter
from mstar.types import TextChunk
from tests.fake_model import FakeRunner
from tests.test_server_support import FakeAdapter

__all__ = ["MediaFakeRunner", "serve", "shared_engine"]


@functools.cache
def shared_engine(name: str) -> Engine:
    """One tiny engine per family for the whole test session (loading costs seconds)."""
    return Engine(name, weights="tiny")


@contextmanager
def serve(engine: Engine, upload_dir: Path, *, max_concurrent: int = 16, max_queue: int = 64, **settings: Any) -> Iterator[InProcessServer]:
    """``create_app(engine)`` on a uvicorn thread bound to 127.0.0.1."""
    upload_dir.mkdir(parents=True, exist_ok=True)
    srv = InProcessServer(engine, upload_dir=upload_dir, max_concurrent=max_concurrent, max_queue=max_queue, **settings).start()
    try:
        yield srv
    finally:
        srv.close()


class MediaFakeRunner(FakeRunner):
    """The fake model, but it decodes every media input in ``validate`` with the shared decoders, as real runners do."""

    name = "fake_media"
    params: ClassVar[dict[str, Param]] = dict(FakeRunner.params)

    def validate(self, inputs: RequestInputs, output_modalities: tuple[str, ...], kwargs: Any) -> dict[str, Any]:
        params = super().validate(inputs, output_modalities, kwargs)
        for item in inputs.images:
            decode_image(item)
        for item in inputs.audio:
            decode_audio(item, sample_rate=16000)
        for item in inputs.video:
            decode_video(item, max_frames=16)
        return params

    def step(self, reqs: list[Request]) -> None:
        for r in reqs:
            r.emit(TextChunk("ok"))
            r.output_tokens += 1
            r.finish("stop")


register_model(ModelInfo("fake_media", "test double: decodes its media, answers ok", "none/fake_media",
                         ("text", "image", "audio", "video"), ("text", "audio"), "tests.test_reliability_support:MediaFakeRunner"))
register_adapter("fake_media", FakeAdapter)


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
    import io

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
    from bench.soak import make_mp4, make_png, make_wav

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
