"""The reliability bad-input corpus (tests/data/bad_inputs_reliability.json): every case gets its documented 4xx.

It extends the server's own corpus (tests/data/server_bad_inputs.json) with what
breaks decoders and fetchers: corrupt and truncated PNG/JPEG/WAV/MP4, content
that does not match its extension, decompression-bomb images, malformed
multipart and JSON, huge and non-positive numbers, non-UTF-8 text, and remote
media URLs aimed at loopback, private, link-local and IPv6-mapped addresses,
directly or through redirects, plus other schemes and overlong URLs.

Media cases run against models that really decode their inputs (pi05,
V-JEPA 2, BAGEL) and against ``fake_media`` (the fake model decoding with the
same shared decoders). Network safety: name resolution is forced numeric (no
DNS query leaves the machine), every outgoing connection is checked to be
loopback (anything else is refused and recorded as a violation), and the one
allowed remote host is a redirector on 127.0.0.1 reached through
``fetch_remote``'s ``resolve`` seam, so redirect targets are what the server
must block.
"""

from __future__ import annotations

import base64
import http.server
import ipaddress
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests

import mstar
from mstar.server import media_io
from tests.helpers.corpus import check_error_answer
from tests.helpers.media import media_recipe
from tests.helpers.servers import serve
from tests.helpers.soak import held_resources

CASES: list[dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "bad_inputs_reliability.json").read_text())
REDIRECTOR_HOST = "redirector.invalid"
_HOSTS_FILE_NAMES = ("localhost", "localhost.")
_REPEAT = re.compile(r"\$repeat:(\d+):(.)", re.S)


# --------------------------------------------------------------------------- network guards and the redirector


class NetGuard:
    """Loopback-only networking for this module: numeric-only resolution, loopback-only connections."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.connections: list[tuple[str, int]] = []
        self._getaddrinfo = socket.getaddrinfo
        self._create_connection = socket.create_connection

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:  # noqa: A002
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _HOSTS_FILE_NAMES:
            flags |= socket.AI_NUMERICHOST  # never ask a DNS server (the resolver is not on loopback)
        return self._getaddrinfo(host, port, family, type, proto, flags)

    def create_connection(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            loopback = host in _HOSTS_FILE_NAMES
        if not loopback:
            self.violations.append(f"{host}:{address[1]}")
            raise OSError(f"test guard: connection to non-loopback {host} refused")
        self.connections.append((host, int(address[1])))
        return self._create_connection(address, *args, **kwargs)


class Redirector:
    """A tiny HTTP server on 127.0.0.1: ``/r?to=URL`` redirects, ``/loop`` loops, ``/img.png`` is a PNG."""

    def __init__(self) -> None:
        hits: list[str] = []
        png = media_recipe("png_ok")

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                hits.append(self.path)
                parts = urlsplit(self.path)
                if parts.path == "/r":
                    self._redirect(parse_qs(parts.query)["to"][0])
                elif parts.path == "/loop":
                    self._redirect("/loop")
                else:  # /img.png, and /sentinel/* which must never be reached
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(png)))
                    self.end_headers()
                    self.wfile.write(png)

            def _redirect(self, to: str) -> None:
                self.send_response(302)
                self.send_header("Location", to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.hits = hits
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{REDIRECTOR_HOST}:{self.port}{path}"


@pytest.fixture(scope="module")
def net() -> Iterator[tuple[NetGuard, Redirector]]:
    guard = NetGuard()
    redirector = Redirector()
    redirector.thread.start()
    real_resolve = media_io._resolve_public

    def resolve(host: str, port: int) -> list[str]:
        # The one exception to "public addresses only": the test's redirector, so that its targets get checked.
        if host == REDIRECTOR_HOST and port == redirector.port:
            return ["127.0.0.1"]
        return real_resolve(host, port)

    mp = pytest.MonkeyPatch()
    mp.setattr(socket, "getaddrinfo", guard.getaddrinfo)
    mp.setattr(socket, "create_connection", guard.create_connection)
    kwdefaults = media_io.fetch_remote.__kwdefaults__
    assert kwdefaults is not None and "resolve" in kwdefaults
    mp.setitem(kwdefaults, "resolve", resolve)
    try:
        yield guard, redirector
    finally:
        mp.undo()
        redirector.httpd.shutdown()
        redirector.httpd.server_close()


@pytest.fixture(scope="module")
def servers(net: Any, tmp_path_factory: pytest.TempPathFactory, shared_engine: Any) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("badinput")
    media = mstar.Engine("fake_media", weights="tiny")
    engines = {"media": media, "remote": media, "pi05": shared_engine("pi05"), "vjepa2": shared_engine("vjepa2"),
               "bagel": shared_engine("bagel")}
    settings: dict[str, Any] = {"max_upload_mb": 1.0, "remote_timeout": 3.0}
    with serve(media, root / "media", **settings) as s_media, \
            serve(media, root / "remote", allow_remote_media=True, **settings) as s_remote, \
            serve(engines["pi05"], root / "pi05", **settings) as s_pi05, \
            serve(engines["vjepa2"], root / "vjepa2", **settings) as s_vjepa2, \
            serve(engines["bagel"], root / "bagel", **settings) as s_bagel:
        yield {"media": s_media, "remote": s_remote, "pi05": s_pi05, "vjepa2": s_vjepa2, "bagel": s_bagel}
    media.close()


# --------------------------------------------------------------------------- building a case


def _expand(value: Any, redirector: Redirector) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, redirector) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, redirector) for v in value]
    if not isinstance(value, str):
        return value
    value = _REPEAT.sub(lambda m: m.group(2) * int(m.group(1)), value)
    value = value.replace("{redirector_port}", str(redirector.port))
    if value.startswith("$dataurl:"):
        _, mime, recipe = value.split(":", 2)
        return f"data:{mime};base64,{base64.b64encode(media_recipe(recipe)).decode()}"
    if value.startswith("$b64:"):
        return base64.b64encode(media_recipe(value[5:])).decode()
    if value.startswith("$redirect:"):
        target = _expand(value[len("$redirect:"):], redirector)
        return redirector.url("/r?to=" + quote(target, safe=""))
    if value.startswith("$redirector:"):
        return redirector.url(value[len("$redirector:"):])
    return value


def _send(url: str, case: dict[str, Any], redirector: Redirector) -> requests.Response:
    kwargs: dict[str, Any] = {"timeout": 60}
    if "json" in case:
        kwargs["data"] = json.dumps(_expand(case["json"], redirector)).encode()
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif "raw" in case:
        kwargs["data"] = case["raw"]["latin1"].encode("latin-1")
        kwargs["headers"] = {"Content-Type": case["raw"]["content_type"]}
    elif "form" in case or "files" in case:
        parts: list[tuple[str, Any]] = [(k, (None, _expand(v, redirector))) for k, v in case.get("form", {}).items()]
        for f in case.get("files", []):
            parts.append((f["field"], (f["filename"], media_recipe(f["recipe"]), "application/octet-stream")))
        kwargs["files"] = parts
    return requests.request(case["method"], url + case["path"], **kwargs)


# --------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_gets_its_documented_4xx(servers: dict[str, Any], net: tuple[NetGuard, Redirector],
                                           case: dict[str, Any]) -> None:
    resp = _send(servers[case["server"]].url, case, net[1])
    err = check_error_answer(resp, case, case["name"])
    assert err["type"] == "invalid_request_error", err


def test_corpus_is_large_unique_and_covers_every_category() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) >= 60 and len(names) == len(set(names))
    assert all(400 <= c["status"] < 500 for c in CASES)
    assert all(c.get("why") for c in CASES), "every case says what it tries"
    for prefix in ("upload_", "bomb_", "mismatch_", "chat_dataurl_", "multipart_", "json_", "native_", "images_size_",
                   "url_loopback", "url_v6_mapped", "url_link_local", "url_private", "url_redirect_to_", "url_file_scheme",
                   "url_overlong"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_redirect_to_an_allowed_target_is_followed(servers: dict[str, Any], net: tuple[NetGuard, Redirector]) -> None:
    # The control for the redirect cases: the redirector itself works, so their 400s come from the blocked targets.
    redirector = net[1]
    url = redirector.url("/r?to=" + quote(redirector.url("/img.png"), safe=""))
    body: dict[str, Any] = {"model": "fake_media", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    resp = requests.post(servers["remote"].url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    assert "/img.png" in redirector.hits


def test_no_connection_ever_left_loopback_and_no_blocked_target_was_reached(net: tuple[NetGuard, Redirector]) -> None:
    guard, redirector = net
    assert guard.violations == []
    assert all(ipaddress.ip_address(h).is_loopback for h, _ in guard.connections)
    assert not [h for h in redirector.hits if h.startswith("/sentinel/")], redirector.hits


def test_servers_are_healthy_and_clean_after_the_corpus(servers: dict[str, Any]) -> None:
    for name in ("media", "remote", "pi05", "vjepa2", "bagel"):
        srv = servers[name]
        assert requests.get(srv.url + "/ready", timeout=10).status_code == 200
        assert srv.wait_idle(10)["inflight"] == 0
        assert srv.leftover_files() == [], name
    files: dict[str, Any] = {"text": (None, "still fine"), "streaming": (None, "false"),
                             "files": ("ok.png", media_recipe("png_ok"))}
    r = requests.post(servers["media"].url + "/generate", timeout=30, files=files)
    assert r.status_code == 200, r.text
    files = {"text": (None, "pick"), "streaming": (None, "false"), "output_modalities": (None, "action"),
             "model_kwargs": (None, json.dumps({"robot_state": [0.1], "num_steps": 2})),
             "files": ("cam.png", media_recipe("png_ok"))}
    r = requests.post(servers["pi05"].url + "/generate", timeout=30, files=files)
    assert r.status_code == 200, r.text
    for name in ("media", "pi05", "vjepa2", "bagel"):
        held = {k: v for k, v in held_resources(servers[name].wait_idle(10)).items() if v}
        assert held == {}, (name, held)
