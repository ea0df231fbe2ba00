"""Inbound media for the server: uploads, data URLs, base64 and (opt-in) remote URLs.

Every blob a request brings is written under the upload directory with a
unique name by an :class:`UploadScope`, and deleted when the scope closes
(the end of the request, whatever happened). Client strings are never read
as server paths. Remote http(s) fetching is off unless enabled; when on, only
public addresses are contacted, checked on every resolved address and every
redirect hop, with the connection pinned to the checked address so DNS
cannot change between check and connect.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from mstar.errors import MediaError, PayloadTooLargeError
from mstar.media import EXTENSIONS, accepted_format, modality_for_filename
from mstar.sniff import sniff_extension

__all__ = [
    "MediaPolicy",
    "UploadScope",
    "check_public_address",
    "extension_for_mime",
    "fetch_remote",
]

_MIME_EXT: dict[str, str] = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/vnd.wave": ".wav",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/ogg": ".ogg",
    "audio/opus": ".opus",
    "audio/aac": ".aac",
    "audio/mp4": ".m4a",
    "audio/x-m4a": ".m4a",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi",
}

# Longest remote media URL accepted (initial or redirect target); browsers and CDNs stop near here too.
MAX_URL_CHARS = 8192

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    """Limits applied to every inbound blob."""

    max_bytes: int = 25 * 1024 * 1024
    allow_remote: bool = False
    remote_timeout: float = 10.0
    max_redirects: int = 3


def extension_for_mime(mime: str) -> str:
    ext = _MIME_EXT.get(mime.lower().split(";")[0].strip())
    if ext is None:
        raise MediaError(f"unsupported media type {mime!r}; supported: {', '.join(sorted(_MIME_EXT))}")
    return ext


# Characters kept in a saved file's name: what a client's file name may hold, less path separators,
# controls and quotes. The name is for messages only (decoders sniff the bytes), so anything else is "_".
_UNSAFE_NAME_CHARS = re.compile(r"[^\w .,+()\[\]=@-]")
_MAX_NAME_BYTES = 120


def _file_name(shown: str) -> str:
    """A file name for a blob the client calls ``shown`` (its base name, made safe): nothing reads
    the saved file's extension, decoders sniff the bytes."""
    base = _UNSAFE_NAME_CHARS.sub("_", re.split(r"[/\\]", shown)[-1]).strip(" .") or "upload"
    while len(base.encode("utf-8")) > _MAX_NAME_BYTES:
        base = base[: len(base) * 3 // 4]
    return base


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MiB"


def _b64decode(text: str, what: str, max_bytes: int) -> bytes:
    # A base64 text four thirds the cap cannot decode under the cap: refuse before decoding.
    if len(text) > (max_bytes * 4) // 3 + 8:
        raise PayloadTooLargeError(f"{what} is larger than the {_mib(max_bytes)} upload limit")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what} is not valid base64") from None


class UploadScope:
    """The media of one request, saved under ``upload_dir``; :meth:`close` deletes them all."""

    def __init__(self, upload_dir: Path, policy: MediaPolicy) -> None:
        self.upload_dir = upload_dir
        self.policy = policy
        self.paths: list[Path] = []

    # ---- saving
    def save(self, data: bytes, ext: str, expected: str | None = None, name: str | None = None) -> tuple[str, Path]:
        """Save one blob; returns ``(modality, path)``. ``expected`` is the modality it must be.

        ``name`` is what the client called it (file name, URL, field), for error messages.
        """
        shown = name or "the upload"
        shown = shown if len(shown) <= 160 else shown[:157] + "..."  # a client's name, quoted in short errors
        if len(data) > self.policy.max_bytes:
            raise PayloadTooLargeError(f"{shown!r} is {len(data)} bytes, over the {_mib(self.policy.max_bytes)} upload limit "
                                       "(--max-upload-mb)")
        if not data:
            raise MediaError(f"{shown!r} is empty")
        ext = ext.lower()
        modality = modality_for_filename("x" + ext)
        if modality is None:
            supported = ", ".join(e for exts in EXTENSIONS.values() for e in exts)
            raise MediaError(f"{shown!r} has an unsupported file extension {ext or '(none)'!r}; supported: {supported}"[:500])
        if expected is not None and modality != expected:
            article = "an" if modality[0] in "aeiou" else "a"
            raise MediaError(f"{shown!r}: expected {expected} media but got {article} {modality} file ({ext})"[:300], param=expected)
        # Refuse at the door what the decoders would refuse: bytes that are not an accepted format of
        # this modality (a playlist or text named .mp3, a TIFF named .png) never reach the engine.
        accepted_format(data, modality, shown)
        # A directory of its own per blob, the file inside named as the client named it: the Engine
        # names media by file name in its errors, and a client must read its own name there, never ours.
        folder = self.upload_dir / uuid.uuid4().hex
        folder.mkdir(mode=0o700)
        self.paths.append(folder)
        path = folder / _file_name(shown)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.paths.append(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return modality, path

    def save_upload(self, filename: str, data: bytes) -> tuple[str, Path]:
        """A multipart file: the modality comes from its extension."""
        return self.save(data, os.path.splitext(filename or "")[1], name=filename)

    def save_base64(self, b64: str, fmt: str | None, expected: str | None = None, name: str | None = None) -> tuple[str, Path]:
        """A bare base64 blob; ``fmt`` (e.g. ``"wav"``) names its format, else it is sniffed.

        ``name`` is where the client put it (``"messages[0].content[1]"``), for error messages.
        """
        name = name or f"base64 {expected or 'media'} data"
        data = _b64decode(b64, name, self.policy.max_bytes)
        ext = ("." + fmt.lower().lstrip(".")) if fmt else sniff_extension(data, expected)
        if ext is None:
            if expected is not None:
                accepted_format(data, expected, name)  # raises, naming the formats accepted for it
            raise MediaError("cannot tell the format of base64 media; use a data URL with a MIME type")
        return self.save(data, ext, expected, name=name)

    def save_data_url(self, url: str, expected: str | None = None, name: str | None = None) -> tuple[str, Path]:
        """A ``data:<mime>;base64,...`` URL; ``name`` as for :meth:`save_base64`."""
        m = _DATA_URL.match(url)
        if m is None or not m.group("b64"):
            raise MediaError("data URLs must look like data:<mime>;base64,<payload>")
        name = name or f"{expected or 'media'} data URL"
        data = _b64decode(m.group("data"), f"the payload of {name}", self.policy.max_bytes)
        mime = m.group("mime")
        ext = extension_for_mime(mime) if mime else sniff_extension(data, expected)
        if ext is None:
            if expected is not None:
                accepted_format(data, expected, name)  # raises, naming the formats accepted for it
            raise MediaError("data URL has no MIME type and its content is not recognised")
        return self.save(data, ext, expected, name=name)

    def resolve_ref(self, ref: Any, expected: str | None = None, name: str | None = None) -> tuple[str, Path]:
        """A media reference from a JSON body: data URL, http(s) URL (if allowed) or bare base64.

        Anything else, including strings that look like server paths, is refused. ``name`` is where
        the client put it (``"messages[0].content[1]"``), for error messages.
        """
        if not isinstance(ref, str) or not ref:
            raise MediaError("a media reference must be a non-empty string (data URL, http(s) URL or base64)")
        if ref.startswith("data:"):
            return self.save_data_url(ref, expected, name)
        try:
            scheme = urlsplit(ref).scheme.lower() if "://" in ref[:16] else ""
        except ValueError as exc:  # e.g. an unterminated IPv6 literal
            raise MediaError(f"the media URL is malformed: {_url_words(exc)}") from None
        if scheme in ("http", "https"):
            if not self.policy.allow_remote:
                raise MediaError(
                    "fetching remote media URLs is disabled on this server; send the media inline as a data URL "
                    "(or start the server with --allow-remote-media)"
                )
            data, ext = fetch_remote(ref, max_bytes=self.policy.max_bytes, timeout=self.policy.remote_timeout,
                                     max_redirects=self.policy.max_redirects)
            return self.save(data, ext, expected, name=ref[:200])
        if scheme:
            raise MediaError(f"unsupported media URL scheme {scheme!r}; use a data URL or base64")
        if ref.startswith(("/", "./", "../", "~")) or "\\" in ref[:3]:
            raise MediaError("server-side paths are not accepted; send the media inline as a data URL or base64")
        return self.save_base64(ref, None, expected, name)

    # ---- cleanup
    def close(self) -> None:
        """Delete every file this scope saved, and the folders holding them."""
        for path in reversed(self.paths):  # each file before its folder
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except FileNotFoundError:
                pass
        self.paths.clear()

    def __enter__(self) -> UploadScope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- remote fetch


def check_public_address(ip: str) -> None:
    """Raise :class:`MediaError` unless ``ip`` is a public unicast address."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped or addr.sixtofour
        if mapped is not None:
            check_public_address(str(mapped))
        if addr.teredo is not None:
            raise MediaError(f"remote media address {ip} is not allowed (Teredo tunnel)")
    blocked = (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or (isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local)
        or not addr.is_global  # shared (100.64/10), documentation and benchmark ranges
    )
    if blocked:
        raise MediaError(f"remote media address {ip} is not a public address; only public hosts may be fetched")


def _resolve_public(host: str, port: int) -> list[str]:
    """Resolve ``host`` and check every address; returns them (all public)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise MediaError(f"cannot resolve remote media host {host[:80]!r}: no address was found for that name") from None
    except (UnicodeError, ValueError):  # not encodable as a host name (IDNA), e.g. a label over 63 characters
        raise MediaError(f"remote media host {host[:80]!r} is not a valid host name (each dot-separated label holds "
                         "1 to 63 characters)") from None
    ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not ips:
        raise MediaError(f"remote media host {host!r} has no address")
    for ip in ips:
        check_public_address(ip)
    return ips


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, ip: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip
        self.raw_sock: socket.socket | None = None  # the TCP socket, for the watchdog

    def connect(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, ip: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        self.raw_sock = sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _Watchdog:
    """Shuts a fetch's socket down when its total deadline passes, whatever the fetch is blocked on.

    Socket timeouts bound each wait for bytes, not the whole transfer: a server sending one byte
    every half second never trips them. The watchdog does, so a fetch holds its worker thread for
    at most the deadline (connect, TLS, headers and body together).
    """

    def __init__(self, conn: _PinnedHTTPConnection | _PinnedHTTPSConnection, deadline: float) -> None:
        self.conn = conn
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.raw_sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv on this socket at once
            except OSError:
                pass

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def fetch_remote(
    url: str,
    *,
    max_bytes: int,
    timeout: float = 10.0,
    max_redirects: int = 3,
    resolve: Callable[[str, int], list[str]] = _resolve_public,
) -> tuple[bytes, str]:
    """Download a public http(s) URL; returns ``(bytes, extension)``.

    Redirects are followed by hand so each hop is checked; the size is capped,
    and so is the total time, however slowly the server sends (see
    :class:`_Watchdog`). ``resolve`` is a seam for tests.
    """
    deadline = time.monotonic() + timeout
    shown = _shown_url(url)
    too_slow = f"fetching remote media {shown} took longer than the {timeout:g} s limit"
    for _ in range(max_redirects + 1):
        if len(url) > MAX_URL_CHARS:
            raise MediaError(f"remote media URL is {len(url)} characters long; at most {MAX_URL_CHARS} are accepted")
        try:
            parts = urlsplit(url)
            given_port = parts.port  # raises for a port that is not a number in 0..65535
        except ValueError as exc:
            raise MediaError(f"remote media URL {_shown_url(url)} is malformed: {_url_words(exc)}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"remote media URL {_shown_url(url)} must be http(s) with a host")
        if parts.username or parts.password:
            raise MediaError("remote media URLs with credentials are not accepted")
        port = given_port or (443 if scheme == "https" else 80)
        ips = resolve(parts.hostname, port)
        left = deadline - time.monotonic()
        if left <= 0:
            raise MediaError(too_slow)
        conn_cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = conn_cls(parts.hostname, ips[0], port, left)
        watchdog = _Watchdog(conn, deadline).__enter__()
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            try:
                conn.request("GET", path, headers={"User-Agent": "mstar-server", "Accept": "*/*"})
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                if watchdog.fired or isinstance(exc, TimeoutError):  # each wait is bounded by the time left
                    raise MediaError(too_slow) from None
                raise MediaError(f"fetching remote media {_shown_url(url)} failed: {_net_words(exc)}") from None
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise MediaError(f"remote media {_shown_url(url)} redirected without a Location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise MediaError(f"remote media {_shown_url(url)} answered HTTP {resp.status}")
            length = (resp.getheader("Content-Length") or "").strip()
            if len(length) > 20 or (length and re.fullmatch(r"[0-9]+", length) and int(length) > max_bytes):
                raise PayloadTooLargeError(f"remote media {_shown_url(url)} is larger than the {_mib(max_bytes)} upload limit")
            chunks: list[bytes] = []
            total = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or watchdog.fired:
                    raise MediaError(too_slow)
                try:
                    if conn.sock is not None:
                        conn.sock.settimeout(left)
                    chunk = resp.read1(65536)  # what has arrived (one read), not a wait for 64 KiB
                except (OSError, http.client.HTTPException) as exc:
                    if watchdog.fired or isinstance(exc, TimeoutError):
                        raise MediaError(too_slow) from None
                    raise MediaError(f"reading remote media {_shown_url(url)} failed: {_net_words(exc)}") from None
                if not chunk:
                    if watchdog.fired:  # the shut-down socket reads as end of data
                        raise MediaError(too_slow)
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise PayloadTooLargeError(f"remote media {_shown_url(url)} is larger than the {_mib(max_bytes)} upload limit")
                chunks.append(chunk)
            data = b"".join(chunks)
            ctype = resp.getheader("Content-Type") or ""
            ext = _MIME_EXT.get(ctype.split(";")[0].strip().lower()) or os.path.splitext(parts.path)[1] or sniff_extension(data)
            if not ext:
                raise MediaError(f"cannot tell the media type of {_shown_url(url)}")
            return data, ext
        finally:
            watchdog.__exit__()
            conn.close()
    raise MediaError(f"remote media {_shown_url(url)} redirected more than {max_redirects} times")


def _url_words(exc: ValueError) -> str:
    """Why ``urlsplit`` (or its ``port``) refused a URL, in our words rather than the library's."""
    text = str(exc)
    if "IPv6" in text:
        return "its bracketed IPv6 host is not closed or not valid"
    if "Port" in text or "port" in text:
        return "its port is not a number from 0 to 65535"
    return "it is not a valid URL"


def _shown_url(url: str) -> str:
    return repr(url) if len(url) <= 200 else repr(url[:197] + "...")


def _net_words(exc: BaseException) -> str:
    """A network failure in our words: no errno numbers or library class names."""
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "the server did not answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(exc, ConnectionResetError):
        return "the server closed the connection"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "its TLS certificate could not be verified"
    if isinstance(exc, ssl.SSLError):
        return "the TLS handshake failed"
    if isinstance(exc, http.client.IncompleteRead):
        return "the server sent less data than it announced"
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.BadStatusLine)):
        return "the server closed the connection without a valid HTTP answer"
    if isinstance(exc, http.client.HTTPException):
        return "the server's answer is not valid HTTP"
    return "the connection failed"
