"""The native API over a real uvicorn: /generate (JSON, NDJSON), /health, /ready, /cancel, disconnects, admission."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import mstar
from mstar.server import create_app
from tests.helpers.media import png_bytes
from tests.helpers.servers import ServerThread

pytestmark = pytest.mark.usefixtures("fake_models")  # the fake families of tests/helpers/fakes.py


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    eng = mstar.Engine("fake", weights="tiny")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def server(engine: Any, upload_dir: Path) -> Iterator[ServerThread]:
    with ServerThread(create_app(engine, upload_dir=upload_dir)) as srv:
        yield srv
    assert list(upload_dir.iterdir()) == [], "uploads must be deleted when their request ends"


def _form(**fields: Any) -> dict[str, Any]:
    return {k: (None, v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items()}


def _lines(resp: requests.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in resp.iter_lines() if line]


def _wait(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_health_answers_healthy(server: ServerThread) -> None:
    assert requests.get(server.url + "/health").json() == {"status": "healthy"}


def test_ready_answers_200_when_the_model_is_loaded(server: ServerThread) -> None:
    r = requests.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_generate_non_streaming_returns_result_document(server: ServerThread) -> None:
    r = requests.post(server.url + "/generate", files=_form(text="hello", streaming="false", model_kwargs={"seed": 7}))
    assert r.status_code == 200
    doc = r.json()
    res = mstar.GenerateResult.from_json(doc)
    assert res.text == "hello"
    assert doc["seed"] == 7 and doc["finish_reason"] == "stop"
    assert doc["usage"]["output_tokens"] == 5


def test_generate_streams_ndjson_ending_with_done(server: ServerThread) -> None:
    r = requests.post(server.url + "/generate", files=_form(text="abc", output_modalities="text,audio"), stream=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = _lines(r)
    events = [mstar.types.event_from_wire(line) for line in lines]
    assert "".join(e.text for e in events if isinstance(e, mstar.TextChunk)) == "abc"
    assert any(isinstance(e, mstar.AudioChunk) and e.sample_rate == 24000 for e in events)
    done = events[-1]
    assert isinstance(done, mstar.Finished) and done.finish_reason == "stop" and done.seed is not None
    assert done.usage.output_tokens == 3


def test_generate_accepts_uploaded_files_and_deletes_them(server: ServerThread, upload_dir: Path) -> None:
    files = {**_form(text="look", streaming="false", input_modalities="text,image"), "files": ("cat.png", png_bytes(), "image/png")}
    r = requests.post(server.url + "/generate", files=files)
    assert r.status_code == 200, r.text
    assert list(upload_dir.iterdir()) == []


def test_generate_honours_request_id(server: ServerThread) -> None:
    r = requests.post(server.url + "/generate", files=_form(text="hi", streaming="false", request_id="my-id-1"))
    assert r.json()["request_id"] == "my-id-1"


def _start_long_stream(server: ServerThread, request_id: str) -> requests.Response:
    r = requests.post(
        server.url + "/generate",
        files=_form(text="slow", request_id=request_id, model_kwargs={"max_output_tokens": 100000, "step_delay": 0.02}),
        stream=True,
    )
    assert r.status_code == 200
    return r


def test_cancel_route_stops_a_streaming_request(server: ServerThread) -> None:
    r = _start_long_stream(server, "to-cancel")
    lines = r.iter_lines()
    next(lines)
    c = requests.post(server.url + "/cancel/to-cancel")
    assert c.status_code == 200 and c.json()["cancelled"] is True
    rest = [json.loads(line) for line in lines if line]
    assert rest[-1]["modality"] == "done" and rest[-1]["metadata"]["finish_reason"] == "cancelled"


def test_cancel_by_body_and_unknown_id_is_remembered(server: ServerThread) -> None:
    c = requests.post(server.url + "/cancel", json={"request_id": "not-yet"})
    assert c.status_code == 200 and c.json()["cancelled"] is False
    # The request arriving just after its cancel is cancelled at once.
    r = requests.post(server.url + "/generate", files=_form(text="late", request_id="not-yet", streaming="false"))
    assert r.json()["finish_reason"] == "cancelled"


def test_cancel_without_id_is_refused(server: ServerThread) -> None:
    for resp in (requests.post(server.url + "/cancel"), requests.post(server.url + "/cancel", json={})):
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "request_id"


def test_duplicate_inflight_request_id_gets_409(server: ServerThread) -> None:
    r = _start_long_stream(server, "dup-native")
    try:
        again = requests.post(server.url + "/generate", files=_form(text="x", request_id="dup-native"))
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "duplicate_request_id"
    finally:
        requests.post(server.url + "/cancel/dup-native")
        r.close()


def _raw_post(server: ServerThread, fields: dict[str, str]) -> socket.socket:
    """POST a multipart form over a bare socket, so the test can hang up mid-request."""
    boundary = "xxBOUNDARYxx"
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items())
    body += f"--{boundary}--\r\n"
    head = (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(head.encode() + body.encode())
    return sock


@pytest.mark.parametrize("streaming", ["true", "false"])
def test_client_disconnect_cancels_within_one_step(server: ServerThread, engine: Any, streaming: str) -> None:
    rid = f"hangup-{streaming}"
    kwargs = json.dumps({"max_output_tokens": 100000, "step_delay": 0.02})
    sock = _raw_post(server, {"text": "bye", "request_id": rid, "streaming": streaming, "model_kwargs": kwargs})
    assert _wait(lambda: engine.scheduler.is_inflight(rid))
    time.sleep(0.1)
    sock.close()
    assert _wait(lambda: not engine.scheduler.is_inflight(rid), 5.0), "the engine kept working after the client left"
    steps, _seconds = engine.stats()["cancel_latencies"][-1]
    assert steps <= 1


def test_error_after_streaming_began_arrives_in_band(server: ServerThread, engine: Any) -> None:
    def fault(req: Any) -> None:
        if req.request_id == "boom" and req.steps >= 2:
            raise RuntimeError("kaboom")

    engine.scheduler.fault_hook = fault
    try:
        r = requests.post(server.url + "/generate", files=_form(text="abcdef", request_id="boom"), stream=True)
        assert r.status_code == 200
        lines = _lines(r)
    finally:
        engine.scheduler.fault_hook = None
    assert lines[0]["modality"] == "text"
    last = mstar.types.event_from_wire(lines[-1])
    assert isinstance(last, mstar.ErrorChunk) and last.status == 500 and last.code == "model_error"
    assert "kaboom" in last.message


def test_error_before_streaming_is_an_http_error(server: ServerThread) -> None:
    r = requests.post(server.url + "/generate", files=_form(text="hi", output_modalities="image"))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unsupported_modality"


def test_queue_beyond_limit_answers_429_with_retry_after(engine: Any, tmp_path: Path) -> None:
    app = create_app(engine, upload_dir=tmp_path, max_concurrent=1, max_queue=1)
    with ServerThread(app) as srv:
        first = _start_long_stream(srv, "adm-1")
        queued: dict[str, Any] = {}

        def second() -> None:
            queued["resp"] = requests.post(srv.url + "/generate", files=_form(text="q", streaming="false", request_id="adm-2"))

        t = threading.Thread(target=second)
        t.start()
        assert _wait(lambda: app.state["mstar"].admission.waiting == 1)
        third = requests.post(srv.url + "/generate", files=_form(text="x", streaming="false"))
        assert third.status_code == 429
        assert int(third.headers["Retry-After"]) >= 1
        assert third.json()["error"]["code"] == "queue_full"
        requests.post(srv.url + "/cancel/adm-1")
        first.close()
        t.join(10)
        assert queued["resp"].status_code == 200  # the queued one ran once a slot freed
        assert app.state["mstar"].admission.running == 0


def test_ready_is_503_until_a_loading_engine_arrives(engine: Any, tmp_path: Path) -> None:
    gate = threading.Event()

    def factory() -> Any:
        gate.wait(10)
        return engine

    app = create_app(factory, model="fake", upload_dir=tmp_path)
    with ServerThread(app) as srv:
        assert requests.get(srv.url + "/health").status_code == 200
        assert requests.get(srv.url + "/ready").status_code == 503
        busy = requests.post(srv.url + "/generate", files=_form(text="hi", streaming="false"))
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "not_ready"
        assert "Retry-After" in busy.headers
        gate.set()
        assert _wait(lambda: requests.get(srv.url + "/ready").status_code == 200)
        ok = requests.post(srv.url + "/generate", files=_form(text="hi", streaming="false"))
        assert ok.status_code == 200
        app.state["mstar"].holder.owned = False  # the module's engine outlives this server


def test_api_key_guards_every_route_but_health(engine: Any, tmp_path: Path) -> None:
    with ServerThread(create_app(engine, upload_dir=tmp_path, api_key="s3cret")) as srv:
        assert requests.get(srv.url + "/health").status_code == 200
        for method, path in (("get", "/ready"), ("post", "/generate"), ("get", "/v1/models"), ("post", "/cancel/x")):
            r = getattr(requests, method)(srv.url + path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = requests.post(srv.url + "/generate", files=_form(text="hi", streaming="false"), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert base64.b64decode(r.json()["outputs"]["text"][0]["data"]) == b"hi"


def test_timeout_mid_stream_ends_with_an_honest_done_line(server: ServerThread) -> None:
    kwargs = {"max_output_tokens": 100000, "step_delay": 0.02, "timeout": 0.2}
    r = requests.post(server.url + "/generate", files=_form(text="tick", model_kwargs=kwargs), stream=True)
    lines = _lines(r)
    assert lines[-1]["modality"] == "done" and lines[-1]["metadata"]["finish_reason"] == "timeout"


def test_client_hanging_up_while_queued_leaves_the_queue(engine: Any, tmp_path: Path) -> None:
    app = create_app(engine, upload_dir=tmp_path, max_concurrent=1, max_queue=4)
    admission = app.state["mstar"].admission
    with ServerThread(app) as srv:
        first = _start_long_stream(srv, "q-hold")
        sock = _raw_post(srv, {"text": "queued", "streaming": "false", "request_id": "q-gone"})
        assert _wait(lambda: admission.waiting == 1)
        sock.close()
        assert _wait(lambda: admission.waiting == 0), "a hung-up client kept its place in the queue"
        assert not engine.scheduler.is_inflight("q-gone")
        requests.post(srv.url + "/cancel/q-hold")
        first.close()
        assert _wait(lambda: admission.running == 0)


def test_generate_accepts_a_json_body(server: ServerThread) -> None:
    r = requests.post(server.url + "/generate", json={"text": "json", "streaming": False, "model_kwargs": {"seed": 1}})
    assert r.status_code == 200 and mstar.GenerateResult.from_json(r.json()).text == "json"


def test_model_failure_without_streaming_is_a_500_with_the_error_shape(server: ServerThread, engine: Any) -> None:
    def fault(req: Any) -> None:
        if req.request_id == "boom-json" and req.steps >= 2:
            raise RuntimeError("kaboom")

    engine.scheduler.fault_hook = fault
    try:
        r = requests.post(server.url + "/generate", files=_form(text="abcdef", request_id="boom-json", streaming="false"))
    finally:
        engine.scheduler.fault_hook = None
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "model_error" and "kaboom" in err["message"] and err["type"] == "server_error"


def test_concurrent_requests_are_batched_and_all_answered(server: ServerThread, engine: Any) -> None:
    results: list[requests.Response] = []
    before = len(engine.runner.batch_sizes)

    def one(i: int) -> None:
        kwargs = {"max_output_tokens": 20, "step_delay": 0.01}
        results.append(requests.post(server.url + "/generate", files=_form(text=f"c{i}", streaming="false", model_kwargs=kwargs)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 6
    assert max(engine.runner.batch_sizes[before:]) > 1
