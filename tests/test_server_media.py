"""Server media handling (uploads, data URLs, the remote-fetch guard) and audio encoding, without a model."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from mstar.errors import InvalidParameterError, MediaError, PayloadTooLargeError
from mstar.server import media_io
from mstar.server.audio_encode import AUDIO_FORMATS, StreamingEncoder, TimeStretcher, encode_pcm16, wav_header
from mstar.server.media_io import MediaPolicy, UploadScope, check_public_address, fetch_remote
from tests.helpers.media import png_bytes

PNG = png_bytes()


# --------------------------------------------------------------------------- upload scope


@pytest.fixture
def scope(tmp_path: Path) -> Iterator[UploadScope]:
    s = UploadScope(tmp_path, MediaPolicy(max_bytes=10_000))
    yield s
    s.close()
    assert list(tmp_path.iterdir()) == []


def test_data_url_is_saved_privately_and_deleted_on_close(scope: UploadScope, tmp_path: Path) -> None:
    modality, path = scope.save_data_url("data:image/png;base64," + base64.b64encode(PNG).decode())
    # A folder of its own in the upload directory; the file is named as the client would read it in errors.
    assert modality == "image" and path.parent.parent == tmp_path and path.name == "media data URL"
    assert path.read_bytes() == PNG
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    scope.close()
    assert not path.exists()


def test_bare_base64_is_sniffed(scope: UploadScope) -> None:
    modality, path = scope.resolve_ref(base64.b64encode(PNG).decode())
    assert modality == "image" and path.read_bytes() == PNG


def test_two_saves_get_unique_names(scope: UploadScope) -> None:
    _, a = scope.save(PNG, ".png")
    _, b = scope.save(PNG, ".png")
    assert a != b


@pytest.mark.parametrize("ref", ["/etc/passwd", "./secret.png", "../up.png", "~/.ssh/id_rsa"])
def test_server_paths_are_never_read(scope: UploadScope, ref: str) -> None:
    with pytest.raises(MediaError, match="server-side paths"):
        scope.resolve_ref(ref)


def test_oversized_upload_is_413(scope: UploadScope) -> None:
    with pytest.raises(PayloadTooLargeError):
        scope.save(b"\x00" * 10_001, ".png")
    with pytest.raises(PayloadTooLargeError):
        scope.save_base64("A" * 20_000, "png")


def test_unsupported_extension_is_400(scope: UploadScope) -> None:
    with pytest.raises(MediaError, match="extension"):
        scope.save_upload("tool.exe", b"MZ")


def test_remote_url_refused_while_disabled(scope: UploadScope) -> None:
    with pytest.raises(MediaError, match="disabled"):
        scope.resolve_ref("https://example.com/cat.png")


# --------------------------------------------------------------------------- remote fetch guard


@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1", "100.64.1.1",
     "::1", "fe80::1", "fd12::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:192.168.1.1", "2002:7f00:1::1", "::"],
)
def test_non_public_addresses_are_blocked(ip: str) -> None:
    with pytest.raises(MediaError, match="not"):
        check_public_address(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(ip: str) -> None:
    check_public_address(ip)


def test_host_resolving_to_any_private_address_is_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)), (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))]

    monkeypatch.setattr(media_io.socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(MediaError, match="10.0.0.1"):
        fetch_remote("http://rebind.example/cat.png", max_bytes=1000)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/cat.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/to-private":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/cat.png")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/to-public":
            self.send_response(301)
            self.send_header("Location", f"http://public.test:{port}/cat.png")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(1.5)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield int(srv.server_address[1])
    srv.shutdown()


def _pretend_public(host: str, port: int) -> list[str]:
    """Resolver seam: 'public.test' stands for a public host (served locally); the rest is checked for real."""
    if host == "public.test":
        return ["127.0.0.1"]
    return media_io._resolve_public(host, port)


def test_public_fetch_returns_bytes_and_type(origin: int) -> None:
    data, ext = fetch_remote(f"http://public.test:{origin}/cat.png", max_bytes=100_000, resolve=_pretend_public)
    assert data == PNG and ext == ".png"


def test_redirect_to_a_public_host_is_followed(origin: int) -> None:
    data, _ = fetch_remote(f"http://public.test:{origin}/to-public", max_bytes=100_000, resolve=_pretend_public)
    assert data == PNG


def test_redirect_hop_to_private_address_is_blocked(origin: int) -> None:
    with pytest.raises(MediaError, match="127.0.0.1"):
        fetch_remote(f"http://public.test:{origin}/to-private", max_bytes=100_000, resolve=_pretend_public)


def test_redirect_loops_are_capped(origin: int) -> None:
    with pytest.raises(MediaError, match="redirected more than"):
        fetch_remote(f"http://public.test:{origin}/loop", max_bytes=100_000, resolve=_pretend_public, max_redirects=2)


def test_remote_size_is_capped(origin: int) -> None:
    with pytest.raises(PayloadTooLargeError):
        fetch_remote(f"http://public.test:{origin}/cat.png", max_bytes=10, resolve=_pretend_public)


def test_remote_time_is_capped(origin: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(MediaError):
        fetch_remote(f"http://public.test:{origin}/slow", max_bytes=1000, timeout=0.5, resolve=_pretend_public)
    assert time.monotonic() - t0 < 1.4


# --------------------------------------------------------------------------- audio encoding


def _tone(seconds: float = 0.5, sr: int = 24000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


def _decoded_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
        return sum(f.samples for f in frames) / float(frames[0].sample_rate)


@pytest.mark.parametrize("fmt", [f for f in AUDIO_FORMATS if f != "pcm"])
def test_every_format_really_encodes(fmt: str) -> None:
    data = encode_pcm16(_tone(), 24000, fmt)
    assert abs(_decoded_seconds(data) - 0.5) < 0.1


@pytest.mark.parametrize("fmt", [f for f in AUDIO_FORMATS if f != "pcm"])
def test_streaming_encoder_output_is_one_valid_file(fmt: str) -> None:
    pcm = _tone()
    enc = StreamingEncoder(fmt, 24000)
    data = b"".join(enc.feed(pcm[i : i + 960]) for i in range(0, len(pcm), 960)) + enc.close()
    assert abs(_decoded_seconds(data) - 0.5) < 0.1


def test_pcm_is_the_raw_samples() -> None:
    pcm = _tone()
    assert encode_pcm16(pcm, 24000, "pcm") == pcm


def test_wav_header_has_exact_sizes_when_known() -> None:
    head = wav_header(24000, 1, 4800)
    assert head[:4] == b"RIFF" and int.from_bytes(head[40:44], "little") == 4800


def test_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="ogg"):
        encode_pcm16(_tone(), 24000, "ogg")


@pytest.mark.parametrize("speed", [0.5, 2.0, 4.0])
def test_time_stretch_changes_duration_not_rate(speed: float) -> None:
    pcm = _tone(1.0)
    ts = TimeStretcher(speed, 24000)
    out = b"".join(ts.feed(pcm[i : i + 4800]) for i in range(0, len(pcm), 4800)) + ts.close()
    assert abs(len(out) / 2 / 24000 - 1.0 / speed) < 0.05 / speed + 0.02
