"""Media arguments normalise in every documented form, and bad media gets a MediaError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

from mstar.errors import MediaError
from mstar.media import MediaItem, decode_audio, decode_image, decode_video, modality_for_filename, normalize_media


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float = 0.1, sr: int = 24000) -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        t = np.arange(int(seconds * sr)) / sr
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims a huge size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_media_arguments_accept_path_bytes_tuple_and_list(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cat.png"
    path.write_bytes(_png(2, 2))
    items = normalize_media([str(path), path.read_bytes(), ("dog.png", b"123")], "image")
    assert [i.name for i in items] == ["cat.png", "image.bin", "dog.png"]
    assert all(isinstance(i, MediaItem) and i.modality == "image" for i in items)
    assert normalize_media(None, "image") == []


def test_modality_comes_from_the_extension() -> None:
    assert modality_for_filename("a.JPG") == "image"
    assert modality_for_filename("a.wav") == "audio"
    assert modality_for_filename("clip.mp4") == "video"
    assert modality_for_filename("notes.txt") is None


def test_images_decode_to_rgb_arrays() -> None:
    arr = decode_image(MediaItem("x.png", _png(3, 2), "image"))
    assert arr.shape == (2, 3, 3) and arr.dtype == np.uint8 and tuple(arr[0, 0]) == (10, 20, 30)


@pytest.mark.parametrize("data", [b"", b"not an image", _png(4, 4)[:40]])
def test_corrupt_images_raise_media_error(data: bytes) -> None:
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_image(MediaItem("x.png", data, "image"))


def test_images_claiming_huge_dimensions_are_refused_before_decoding() -> None:
    with pytest.raises(MediaError, match="pixels are accepted"):
        decode_image(MediaItem("bomb.png", _bomb_png(60000, 60000), "image"))


def test_audio_decodes_and_resamples_to_the_requested_rate() -> None:
    audio, sr = decode_audio(MediaItem("a.wav", _wav(0.1, 24000), "audio"), sample_rate=16000)
    assert sr == 16000 and abs(audio.shape[0] - 1600) <= 1 and np.abs(audio).max() <= 1.0


@pytest.mark.parametrize("data", [b"RIFF....WAVEfmt garbage", b"\x00" * 64])
def test_corrupt_audio_raises_media_error(data: bytes) -> None:
    with pytest.raises(MediaError):
        decode_audio(MediaItem("a.wav", data, "audio"))


def test_corrupt_video_raises_media_error() -> None:
    with pytest.raises(MediaError):
        decode_video(MediaItem("v.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100, "video"))
