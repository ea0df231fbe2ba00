"""The bad-input corpus: every case gets its documented 4xx with a clear OpenAI-shaped error, never a 5xx.

The cases are data (tests/data/server_bad_inputs.json) so the reliability
suite can extend them. A case names: method, path, a body (``json``, ``form``
with optional ``files`` of a given ``size``, a raw ``body`` with ``content_type``, or
``body_fill``: an object padded to that many bytes), which server
(``default``, or ``remote`` with remote media enabled), its ``auth`` (ok, none,
wrong, basic), an optional ``inflight`` request id to occupy first, and the
expected ``status`` plus optional ``code``, ``param`` and ``message`` fragment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import mstar
from mstar.server import create_app
from tests.helpers.servers import ServerThread

pytestmark = pytest.mark.usefixtures("fake_models")  # the fake families of tests/helpers/fakes.py

CASES: list[dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "server_bad_inputs.json").read_text())
API_KEY = "corpus-key"
AUTH = {"ok": f"Bearer {API_KEY}", "wrong": "Bearer not-the-key", "basic": "Basic Y29ycHVzOmtleQ==", "none": None}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerThread]]:
    upload_dir = tmp_path_factory.mktemp("uploads")
    engine = mstar.Engine("fake", weights="tiny")
    settings = {"upload_dir": upload_dir, "api_key": API_KEY, "max_upload_mb": 0.05, "remote_timeout": 2.0}
    with ServerThread(create_app(engine, **settings)) as default, ServerThread(create_app(engine, allow_remote_media=True, **settings)) as remote:
        yield {"default": default, "remote": remote}
    engine.close()
    assert list(upload_dir.iterdir()) == [], "uploads must be deleted when their request ends"


def _send(srv: ServerThread, case: dict[str, Any]) -> requests.Response:
    headers: dict[str, str] = {}
    auth = AUTH[case.get("auth", "ok")]
    if auth:
        headers["Authorization"] = auth
    kwargs: dict[str, Any] = {"headers": headers, "timeout": 30}
    if "json" in case:
        kwargs["json"] = case["json"]
    elif "body" in case:
        kwargs["data"] = case["body"].encode()
        headers["Content-Type"] = case["content_type"]
    elif "body_fill" in case:  # a JSON object padded to body_fill bytes
        kwargs["data"] = b"{" + b" " * case["body_fill"] + b"}"
        headers["Content-Type"] = case["content_type"]
    elif "form" in case or "files" in case:
        files: list[tuple[str, Any]] = [(k, (None, v)) for k, v in case.get("form", {}).items()]
        for f in case.get("files", []):
            files.append((f["field"], (f["filename"], b"\x00" * f["size"])))
        kwargs["files"] = files
    return requests.request(case["method"], srv.url + case["path"], **kwargs)


def _occupy(srv: ServerThread, request_id: str) -> requests.Response:
    kwargs = json.dumps({"max_output_tokens": 100000, "step_delay": 0.02})
    resp = requests.post(
        srv.url + "/generate",
        files={"text": (None, "busy"), "request_id": (None, request_id), "model_kwargs": (None, kwargs)},
        headers={"Authorization": AUTH["ok"]},
        stream=True,
    )
    assert resp.status_code == 200
    return resp


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_gets_documented_4xx(servers: dict[str, ServerThread], case: dict[str, Any]) -> None:
    srv = servers[case.get("server", "default")]
    busy = _occupy(srv, case["inflight"]) if "inflight" in case else None
    try:
        resp = _send(srv, case)
    finally:
        if busy is not None:
            requests.post(srv.url + f"/cancel/{case['inflight']}", headers={"Authorization": AUTH["ok"]})
            busy.close()
    assert resp.status_code == case["status"], resp.text
    doc = resp.json()
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    if "code" in case:
        assert err["code"] == case["code"], err
    if "param" in case:
        assert err["param"] == case["param"], err
    if "message" in case:
        assert case["message"].lower() in err["message"].lower(), err
    if resp.status_code == 401:
        assert resp.headers.get("WWW-Authenticate") == "Bearer"


def test_corpus_is_large_and_names_are_unique() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 60
    assert all(400 <= c["status"] < 500 for c in CASES)


def test_server_still_serves_after_the_corpus(servers: dict[str, ServerThread]) -> None:
    t0 = time.monotonic()
    r = requests.post(
        servers["default"].url + "/generate",
        files={"text": (None, "ok"), "streaming": (None, "false")},
        headers={"Authorization": AUTH["ok"]},
    )
    assert r.status_code == 200 and time.monotonic() - t0 < 5
