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
    with pytest.raises(MediaError, match="the limit is 16777216 pixels"):
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


# --------------------------------------------------------------------------- sniffing (mstar.sniff)

# The first bytes of real files (PIL, soundfile and PyAV wrote them), and the extension each is recognised as.
SNIFF_TABLE = [
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", None, ".png"),
    ("jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01", None, ".jpg"),
    ("gif", b"GIF87a\x04\x00\x04\x00\x81\x00\x00\x00\x00\x00", None, ".gif"),
    ("webp", b"RIFF$\x00\x00\x00WEBPVP8 ", None, ".webp"),
    ("bmp", b"BMf\x00\x00\x00\x00\x00\x00\x006\x00\x00\x00(\x00", None, ".bmp"),
    ("wav", b"RIFF\xec\x00\x00\x00WAVEfmt \x10\x00\x00\x00", None, ".wav"),
    ("flac", b'fLaC\x00\x00\x00"\x10\x00\x10\x00', None, ".flac"),
    ("mp3 with ID3", b"ID3\x04\x00\x00\x00\x00\x00#TSSE", None, ".mp3"),
    ("mp3 frame", b"\xff\xfb\x90\x64\x00\x00\x00\x00", None, ".mp3"),
    ("aac adts", b"\xff\xf1X@\x03\x9f\xfc\xde", None, ".aac"),
    ("ogg vorbis", b"OggS\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\xd4\xb7", None, ".ogg"),
    ("m4a", b"\x00\x00\x00\x1cftypM4A \x00\x00\x02\x00M4A isom", None, ".m4a"),
    ("mp4", b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00isomiso2", None, ".mp4"),
    ("mp4 given as audio", b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00isomiso2", "audio", ".m4a"),
    ("mov", b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  ", None, ".mov"),
    ("webm", b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04B\xf3\x81\x08B\x82\x84webm", None, ".webm"),
    ("mkv", b"\x1aE\xdf\xa3\xa3B\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04B\xf3\x81\x08B\x82\x88matroska", None, ".mkv"),
    ("avi", b"RIFF\xdc\x16\x00\x00AVI LIST\xec\x11\x00\x00hdrl", None, ".avi"),
    ("text", b"hello, world", None, None),
    ("bare BM", b"BM", "image", None),
    ("empty", b"", None, None),
]


@pytest.mark.parametrize("data, modality, ext", [row[1:] for row in SNIFF_TABLE], ids=[row[0] for row in SNIFF_TABLE])
def test_sniffing_names_each_format(data: bytes, modality: str | None, ext: str | None) -> None:
    from mstar.sniff import sniff_extension

    assert sniff_extension(data, modality) == ext
    if ext is not None:
        assert modality_for_filename("x" + ext) is not None, "every sniffed extension is an accepted one"


@pytest.mark.parametrize("ext, modality", [(".avi", "video"), (".bmp", "image"), (".m4a", "audio")])
def test_client_and_server_agree_on_the_formats_they_used_to_disagree_on(ext: str, modality: str) -> None:
    import base64
    import tempfile
    from pathlib import Path

    from mstar.client.form import name_upload
    from mstar.server.media_io import MediaPolicy, UploadScope

    data = next(row[1] for row in SNIFF_TABLE if row[3] == ext and row[2] is None)
    assert name_upload(MediaItem(f"{modality}.bin", data, modality)).name == modality + ext
    with tempfile.TemporaryDirectory() as tmp, UploadScope(Path(tmp), MediaPolicy()) as scope:
        # The server saves under the client's name (no extension of its own): it must sniff the same modality.
        got_modality, path = scope.resolve_ref(base64.b64encode(data).decode())
        assert got_modality == modality and path.read_bytes() == data
