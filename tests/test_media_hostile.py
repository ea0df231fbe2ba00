"""Hostile media: bytes that would make FFmpeg or Pillow read server files or run other programs.

Two holes closed in mstar/media.py and mstar/server/media_io.py:

* an FFmpeg playlist (ffconcat, HLS ...) uploaded as ``clip.mp3`` made PyAV open the files it names,
  relative to the server's working directory; a missing file answered ``[Errno 2]`` (an oracle);
* Pillow opened whatever plugin matched (TIFF, PCX, ICO, EPS through Ghostscript ...), not only the
  PNG, JPEG, WebP, GIF and BMP the server documents.

Every playlist here points at a real, valid WAV "canary" in the current directory: if anything decoded
it, the request would succeed. Each must instead be refused with a MediaError (HTTP 400) that names the
accepted formats and the client's name for the media, and says nothing of files. Valid media of every
accepted format must still decode.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import requests

from mstar import media as media_mod
from mstar.errors import MediaError
from mstar.media import MediaItem, decode_audio, decode_image, decode_video, modality_for_filename, normalize_media
from mstar.server import media_io
from mstar.server.media_io import MediaPolicy, UploadScope
from tests.helpers.media import make_mp4, make_png, make_wav

AUDIO_ACCEPTED = "WAV, FLAC, MP3"
VIDEO_ACCEPTED = "MP4/MOV, WebM/Matroska or AVI"
IMAGE_ACCEPTED = "PNG, JPEG, WebP, GIF or BMP"
ACCEPTED = {"audio": AUDIO_ACCEPTED, "video": VIDEO_ACCEPTED, "image": IMAGE_ACCEPTED}

CONTAINER_EXTS = (".mp3", ".wav", ".flac", ".ogg", ".m4a", ".mp4", ".mov", ".webm", ".mkv", ".avi")

# Playlists that make FFmpeg open other inputs. They name "canary.wav" in the working directory.
PLAYLISTS: dict[str, bytes] = {
    "ffconcat": b"ffconcat version 1.0\nfile 'canary.wav'\n",
    "ffconcat_file_url": b"ffconcat version 1.0\nfile 'file:canary.wav'\n",
    "ffconcat_subfile": b"ffconcat version 1.0\nfile 'subfile,,start,0,end,0,,:canary.wav'\n",
    "hls": b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\ncanary.wav\n#EXT-X-ENDLIST\n",
    "hls_file_url": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nfile:canary.wav\n#EXT-X-ENDLIST\n",
    "m3u": b"#EXTM3U\ncanary.wav\n",
}


@pytest.fixture
def canary_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory holds a valid WAV that every playlist names."""
    (tmp_path / "canary.wav").write_bytes(make_wav(0.5))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _decode(item: MediaItem) -> Any:
    decoders: dict[str, Callable[[MediaItem], Any]] = {"audio": decode_audio, "video": decode_video, "image": decode_image}
    return decoders[item.modality](item)


def _assert_refused_cleanly(message: str, modality: str, name: str) -> None:
    assert ACCEPTED[modality] in message, message
    assert name in message, "the error names what the client called the media"
    for leak in ("Errno", "No such file", "canary", "<none>", "/tmp", "concat", "hls"):
        assert leak not in message, f"the error leaks {leak!r}: {message}"


# --------------------------------------------------------------------------- Engine-level decoding


def test_the_playlist_hole_is_real_without_the_fix(canary_dir: Path) -> None:
    """FFmpeg's own probing would pick the concat demuxer and read the canary (why format= is forced)."""
    container: Any = av.open(io.BytesIO(PLAYLISTS["ffconcat"]))
    with container:
        assert container.format.name == "concat"
        assert sum(f.samples for f in container.decode(audio=0)) > 0


@pytest.mark.parametrize("ext", CONTAINER_EXTS)
@pytest.mark.parametrize("kind", list(PLAYLISTS))
def test_playlists_under_any_container_name_are_refused(canary_dir: Path, ext: str, kind: str) -> None:
    modality = modality_for_filename("clip" + ext)
    assert modality in ("audio", "video")
    (item,) = normalize_media([(f"clip{ext}", PLAYLISTS[kind])], modality)
    with pytest.raises(MediaError) as err:
        _decode(item)
    assert err.value.status_code == 400
    _assert_refused_cleanly(str(err.value), modality, f"clip{ext}")


@pytest.mark.parametrize("ext", (".mp3", ".mp4"))
def test_playlist_files_read_from_a_path_are_refused(canary_dir: Path, ext: str) -> None:
    path = canary_dir / f"clip{ext}"
    path.write_bytes(PLAYLISTS["ffconcat"])
    modality = modality_for_filename(path.name)
    assert modality is not None
    (item,) = normalize_media(str(path), modality)
    with pytest.raises(MediaError, match="could not be decoded"):
        _decode(item)


def test_a_missing_playlist_target_answers_exactly_like_a_present_one(canary_dir: Path) -> None:
    """No oracle: whether the named file exists changes nothing in the answer."""
    messages = []
    for target in (b"canary.wav", b"does-not-exist.wav"):
        with pytest.raises(MediaError) as err:
            decode_audio(MediaItem("clip.mp3", b"ffconcat version 1.0\nfile '" + target + b"'\n", "audio"))
        messages.append(str(err.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("data", [b"", b"plain text\n" * 8, b"\x00" * 256, b"%!PS-Adobe-3.0\n"])
def test_unrecognised_bytes_are_refused_naming_the_accepted_formats(data: bytes) -> None:
    for modality in ("audio", "video", "image"):
        with pytest.raises(MediaError) as err:
            _decode(MediaItem("thing.bin", data, modality))
        _assert_refused_cleanly(str(err.value), modality, "thing.bin")


def test_the_engine_refuses_a_playlist_before_its_model_runs(canary_dir: Path, shared_engine: Callable[[str], Any]) -> None:
    engine = shared_engine("fake_media")
    with pytest.raises(MediaError) as err:
        engine.generate(text="listen", audio=("clip.mp3", PLAYLISTS["ffconcat"]))
    _assert_refused_cleanly(str(err.value), "audio", "clip.mp3")


# --------------------------------------------------------------------------- how PyAV is opened


def _encode_audio(fmt: str, codec: str, rate: int = 16000, seconds: float = 0.3) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream: Any = container.add_stream(codec, rate=rate, layout="mono")
        sample_fmt = stream.codec_context.codec.audio_formats[0].name
        resampler = av.AudioResampler(format=sample_fmt, layout="mono", rate=rate)
        n = int(rate * seconds)
        x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)
        size = stream.codec_context.frame_size or 1024
        for i in range(0, n, size):
            frame = av.AudioFrame.from_ndarray(x[None, i:i + size], format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for out in resampler.resample(frame):
                for packet in stream.encode(out):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _encode_video(fmt: str, codec: str) -> bytes:
    return make_mp4(fmt=fmt, codec=codec)


# (file name, recipe, the demuxer mstar must pick)
VALID_AUDIO: list[tuple[str, Callable[[], bytes], str]] = [
    ("a.wav", make_wav, "wav"),
    ("a.flac", lambda: _encode_audio("flac", "flac"), "flac"),
    ("a.mp3", lambda: _encode_audio("mp3", "libmp3lame"), "mp3"),
    ("a.ogg", lambda: _encode_audio("ogg", "libopus", 48000), "ogg"),
    ("a.aac", lambda: _encode_audio("adts", "aac"), "aac"),
    ("a.m4a", lambda: _encode_audio("ipod", "aac"), "mov"),
    ("a.mov", lambda: _encode_audio("mov", "aac"), "mov"),
    ("a.webm", lambda: _encode_audio("webm", "libopus", 48000), "matroska"),
    ("a.mkv", lambda: _encode_audio("matroska", "flac"), "matroska"),
]
VALID_VIDEO: list[tuple[str, Callable[[], bytes], str]] = [
    ("v.mp4", make_mp4, "mov"),
    ("v.mov", lambda: _encode_video("mov", "mpeg4"), "mov"),
    ("v.webm", lambda: _encode_video("webm", "libvpx"), "matroska"),
    ("v.mkv", lambda: _encode_video("matroska", "mpeg4"), "matroska"),
    ("v.avi", lambda: _encode_video("avi", "mpeg4"), "avi"),
]


class _OpenSpy:
    """Records how mstar calls ``av.open`` (and forwards the call)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        self._open = av.open
        monkeypatch.setattr(av, "open", self)

    def __call__(self, file: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append({"file": file, **kwargs})
        return self._open(file, *args, **kwargs)


def _check_open_calls(spy: _OpenSpy, demuxer: str) -> None:
    for call in spy.calls:
        assert isinstance(call["file"], io.BytesIO), "FFmpeg is only ever handed the bytes, never a path"
        assert call["format"] == demuxer, "the demuxer comes from the sniffer, not from FFmpeg's probing"
        opts = call["container_options"]
        assert opts["protocol_whitelist"] == "none"
        if demuxer == "mov":
            assert opts["enable_drefs"] == "0"


@pytest.mark.parametrize("name, recipe, demuxer", VALID_AUDIO, ids=[r[0] for r in VALID_AUDIO])
def test_every_accepted_audio_format_decodes(monkeypatch: pytest.MonkeyPatch, name: str, recipe: Callable[[], bytes], demuxer: str) -> None:
    data = recipe()
    spy = _OpenSpy(monkeypatch)
    audio, sr = decode_audio(MediaItem(name, data, "audio"), sample_rate=16000)
    assert sr == 16000 and audio.shape[0] > 1000 and np.abs(audio).max() > 0.05
    _check_open_calls(spy, demuxer)
    # The name does not choose the decoder: the same bytes under another name decode the same way.
    again, _ = decode_audio(MediaItem("renamed.mp3", data, "audio"), sample_rate=16000)
    assert again.shape == audio.shape


@pytest.mark.parametrize("name, recipe, demuxer", VALID_VIDEO, ids=[r[0] for r in VALID_VIDEO])
def test_every_accepted_video_format_decodes(monkeypatch: pytest.MonkeyPatch, name: str, recipe: Callable[[], bytes], demuxer: str) -> None:
    data = recipe()
    spy = _OpenSpy(monkeypatch)
    frames, fps = decode_video(MediaItem(name, data, "video"))
    assert frames.shape[0] >= 3 and frames.shape[1:] == (32, 32, 3) and fps > 0
    assert spy.calls
    _check_open_calls(spy, demuxer)


def test_an_audio_only_container_is_not_taken_as_video() -> None:
    with pytest.raises(MediaError, match=VIDEO_ACCEPTED):
        decode_video(MediaItem("v.mp4", _encode_audio("ipod", "aac"), "video"))


# --------------------------------------------------------------------------- images


def _pillow_bytes(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
# A DOS EPS binary header (C5 D0 D3 C6), whose PostScript section is the text above.
DOS_EPS = b"\xc5\xd0\xd3\xc6" + (30).to_bytes(4, "little") + len(EPS).to_bytes(4, "little") + bytes(18) + EPS
EXOTIC_IMAGES: dict[str, Callable[[], bytes]] = {
    "tiff": lambda: _pillow_bytes("TIFF"),
    "pcx": lambda: _pillow_bytes("PCX"),
    "ico": lambda: _pillow_bytes("ICO"),
    "ppm": lambda: _pillow_bytes("PPM"),
    "tga": lambda: _pillow_bytes("TGA"),
    "eps": lambda: EPS,
    "dos_eps": lambda: DOS_EPS,
    "ps": lambda: b"%!PS\n/Helvetica findfont 12 scalefont setfont\nshowpage\n",
}


@pytest.fixture
def no_ghostscript(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any attempt to run a program or to use Pillow's EPS plugin (which runs Ghostscript)."""
    import subprocess

    from PIL import EpsImagePlugin

    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            attempts.append(what)
            raise AssertionError(f"{what} must never be reached")
        return call

    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse("EpsImagePlugin.Ghostscript"))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse("EpsImageFile._open"))
    return attempts


@pytest.mark.parametrize("name", ["photo.png", "photo.jpg"])
@pytest.mark.parametrize("kind", list(EXOTIC_IMAGES))
def test_exotic_images_are_refused(no_ghostscript: list[str], kind: str, name: str) -> None:
    with pytest.raises(MediaError) as err:
        decode_image(MediaItem(name, EXOTIC_IMAGES[kind](), "image"))
    assert err.value.status_code == 400
    _assert_refused_cleanly(str(err.value), "image", name)
    assert no_ghostscript == []


def test_pillow_itself_is_limited_to_the_sniffed_format(monkeypatch: pytest.MonkeyPatch, no_ghostscript: list[str]) -> None:
    """Second line: even if the sniffer were fooled, Pillow may only use the plugin it named."""
    monkeypatch.setattr(media_mod, "sniff_extension", lambda data, modality=None: ".png")
    for kind in ("tiff", "eps"):
        with pytest.raises(MediaError, match="not a valid PNG image"):
            decode_image(MediaItem("photo.png", EXOTIC_IMAGES[kind](), "image"))
    assert no_ghostscript == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_accepted_image_format_decodes(fmt: str) -> None:
    arr = decode_image(MediaItem("x.img", _pillow_bytes(fmt), "image"))
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


# --------------------------------------------------------------------------- the server's door (UploadScope)


@pytest.fixture
def scope(tmp_path: Path) -> Any:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    with UploadScope(uploads, MediaPolicy(allow_remote=True)) as s:
        yield s
    assert list(uploads.iterdir()) == [], "nothing refused is left on disk"


@pytest.mark.parametrize("ext", CONTAINER_EXTS)
def test_uploads_of_playlists_are_refused_at_the_door(canary_dir: Path, scope: UploadScope, ext: str) -> None:
    modality = modality_for_filename("x" + ext)
    assert modality is not None
    for data in PLAYLISTS.values():
        with pytest.raises(MediaError) as err:
            scope.save_upload(f"clip{ext}", data)
        _assert_refused_cleanly(str(err.value), modality, f"clip{ext}")
    assert scope.paths == []


def test_base64_and_data_urls_of_playlists_are_refused(canary_dir: Path, scope: UploadScope) -> None:
    b64 = base64.b64encode(PLAYLISTS["ffconcat"]).decode()
    for call in (
        lambda: scope.save_base64(b64, "mp3", expected="audio"),
        lambda: scope.save_base64(b64, None, expected="audio"),
        lambda: scope.resolve_ref("data:audio/mpeg;base64," + b64, expected="audio"),
        lambda: scope.resolve_ref("data:;base64," + b64, expected="audio"),
        lambda: scope.resolve_ref(b64, expected="audio"),
    ):
        with pytest.raises(MediaError, match=AUDIO_ACCEPTED):
            call()


def test_fetched_playlists_are_refused(canary_dir: Path, scope: UploadScope, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media_io, "fetch_remote", lambda url, **_: (PLAYLISTS["hls"], ".mp3"))
    with pytest.raises(MediaError) as err:
        scope.resolve_ref("https://media.example/clip.mp3", expected="audio")
    _assert_refused_cleanly(str(err.value), "audio", "https://media.example/clip.mp3")


def test_exotic_images_are_refused_at_the_door(scope: UploadScope, no_ghostscript: list[str]) -> None:
    for data in (EXOTIC_IMAGES["tiff"](), EXOTIC_IMAGES["eps"]()):
        with pytest.raises(MediaError, match=IMAGE_ACCEPTED):
            scope.save_upload("photo.png", data)
        with pytest.raises(MediaError, match=IMAGE_ACCEPTED):
            scope.resolve_ref("data:image/jpeg;base64," + base64.b64encode(data).decode(), expected="image")
    assert no_ghostscript == []


def test_valid_media_passes_the_door(scope: UploadScope) -> None:
    assert scope.save_upload("a.wav", make_wav())[0] == "audio"
    assert scope.save_upload("v.mp4", make_mp4())[0] == "video"
    assert scope.save_upload("p.png", make_png())[0] == "image"


# --------------------------------------------------------------------------- through the HTTP routes


def _error(resp: requests.Response) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert err["code"] == "invalid_media"
    return err


@pytest.mark.parametrize("ext", CONTAINER_EXTS)
def test_generate_refuses_playlist_uploads(canary_dir: Path, served: Any, ext: str) -> None:
    s = served("fake_media")
    for kind in ("ffconcat", "hls"):
        files: list[tuple[str, Any]] = [("text", (None, "listen")), ("streaming", (None, "false")),
                                        ("files", (f"clip{ext}", PLAYLISTS[kind], "application/octet-stream"))]
        err = _error(requests.post(s.url + "/generate", files=files, timeout=60))
        _assert_refused_cleanly(err["message"], modality_for_filename("x" + ext) or "", f"clip{ext}")


def test_decoders_refuse_playlists_even_past_the_door(canary_dir: Path, served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the upload check switched off, the model's own decoding still refuses (defence in depth)."""
    s = served("fake_media")
    monkeypatch.setattr(media_io, "accepted_format", lambda *args, **kwargs: ".mp3")
    for name in ("clip.mp3", "clip.mp4"):
        files: list[tuple[str, Any]] = [("text", (None, "listen")), ("streaming", (None, "false")),
                                        ("files", (name, PLAYLISTS["ffconcat"], "application/octet-stream"))]
        err = _error(requests.post(s.url + "/generate", files=files, timeout=60))
        assert "could not be decoded" in err["message"] and "Errno" not in err["message"]


# The server takes an upload's modality from its extension: audio-only .mov/.webm/.mkv would be read as video.
SERVABLE = [(name, recipe) for name, recipe, _ in VALID_AUDIO + VALID_VIDEO
            if modality_for_filename(name) == ("audio" if name.startswith("a.") else "video")]


@pytest.mark.parametrize("name, recipe", SERVABLE, ids=[r[0] for r in SERVABLE])
def test_generate_accepts_every_accepted_format(served: Any, name: str, recipe: Callable[[], bytes]) -> None:
    s = served("fake_media")
    files: list[tuple[str, Any]] = [("text", (None, "look")), ("streaming", (None, "false")),
                                    ("files", (name, recipe(), "application/octet-stream"))]
    resp = requests.post(s.url + "/generate", files=files, timeout=60)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("fmt", ["mp3", "wav", None])
def test_qwen3_omni_input_audio_refuses_playlists(canary_dir: Path, served: Any, fmt: str | None) -> None:
    s = served("qwen3_omni")
    audio: dict[str, Any] = {"data": base64.b64encode(PLAYLISTS["ffconcat"]).decode()}
    if fmt:
        audio["format"] = fmt
    content = [{"type": "text", "text": "what"}, {"type": "input_audio", "input_audio": audio}]
    body: dict[str, Any] = {"model": "qwen3_omni", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    err = _error(requests.post(s.url + "/v1/chat/completions", json=body, timeout=120))
    _assert_refused_cleanly(err["message"], "audio", "messages[0].content[1]")  # where the client put it


@pytest.mark.parametrize("kind", ["tiff", "pcx", "ico", "eps"])
def test_bagel_image_url_refuses_exotic_images(served: Any, no_ghostscript: list[str], kind: str) -> None:
    s = served("bagel")
    url = "data:image/png;base64," + base64.b64encode(EXOTIC_IMAGES[kind]()).decode()
    content = [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": url}}]
    body: dict[str, Any] = {"model": "bagel", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    err = _error(requests.post(s.url + "/v1/chat/completions", json=body, timeout=120))
    _assert_refused_cleanly(err["message"], "image", "messages[0].content[1]")
    assert no_ghostscript == []
