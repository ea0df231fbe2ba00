"""Fault injection against a real uvicorn server: a failing model step, a slow reader, a slow body, a loading model.

Each fault must hurt only the request it belongs to, answer with a typed error
(an in-band NDJSON/SSE error once streaming began, else an OpenAI-shaped HTTP
error), and leave the server serving and holding nothing.
"""

from __future__ import annotations

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
from mstar.request import Request
from mstar.server import create_app
from tests.helpers.servers import ServerThread, serve

pytestmark = pytest.mark.usefixtures("fake_models")  # the fake families of tests/helpers/fakes.py

INJECTED = "injected fault for the reliability test"


@pytest.fixture(scope="module")
def engine() -> Iterator[mstar.Engine]:
    eng = mstar.Engine("fake", weights="tiny")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine: mstar.Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with serve(engine, tmp_path_factory.mktemp("faults")) as srv:
        yield srv
    assert srv.leftover_files() == []


@pytest.fixture()
def doomed(engine: mstar.Engine) -> Iterator[set[str]]:
    """Request ids listed here fail on their third model step (the Engine's fault hook)."""
    ids: set[str] = set()

    def hook(req: Request) -> None:
        if req.request_id in ids and req.steps >= 2:
            raise RuntimeError(INJECTED)

    engine.scheduler.fault_hook = hook
    yield ids
    engine.scheduler.fault_hook = None


def _generate(url: str, rid: str | None = None, *, streaming: bool = True, tokens: int = 30, delay: float = 0.01,
              outputs: str = "text", **kw: Any) -> requests.Response:
    fields = {"text": (None, "reliability"), "streaming": (None, "true" if streaming else "false"),
              "output_modalities": (None, outputs),
              "model_kwargs": (None, json.dumps({"max_output_tokens": tokens, "step_delay": delay}))}
    if rid is not None:
        fields["request_id"] = (None, rid)
    return requests.post(url + "/generate", files=fields, timeout=30, **kw)


def _lines(resp: requests.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in resp.iter_lines() if line]


def _chat(url: str, *, stream: bool) -> requests.Response:
    body: dict[str, Any] = {"model": "fake", "messages": [{"role": "user", "content": "reliability"}], "max_tokens": 30,
            "step_delay": 0.01, "stream": stream}
    return requests.post(url + "/v1/chat/completions", json=body, timeout=30, stream=stream)


def _wait_idle(engine: mstar.Engine, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = engine.stats()
        if (st["inflight"] == 0 and st["kv_slots_used"] == 0) or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def _serves(url: str) -> None:
    r = _generate(url, streaming=False, tokens=3, delay=0.0)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "length"


# --------------------------------------------------------------------------- a model step that raises


def test_failing_step_ends_its_stream_with_an_error_line_and_spares_the_other(server: Any, engine: mstar.Engine,
                                                                               doomed: set[str]) -> None:
    doomed.add("doomed-ndjson")
    out: dict[str, list[dict[str, Any]]] = {}

    def run(rid: str) -> None:
        with _generate(server.url, rid, stream=True) as resp:
            assert resp.status_code == 200
            out[rid] = _lines(resp)

    threads = [threading.Thread(target=run, args=(rid,)) for rid in ("doomed-ndjson", "bystander-ndjson")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    bad, good = out["doomed-ndjson"], out["bystander-ndjson"]
    assert bad[-1]["modality"] == "error"
    meta = bad[-1]["metadata"]
    assert meta["status"] == 500 and meta["code"] == "model_error" and INJECTED in meta["message"]
    assert 1 <= sum(1 for line in bad if line["modality"] == "text") < 30, "it streamed, then stopped at the fault"
    assert good[-1]["modality"] == "done" and good[-1]["metadata"]["finish_reason"] == "length"
    assert sum(1 for line in good if line["modality"] == "text") == 30
    assert _wait_idle(engine)["kv_slots_used"] == 0
    _serves(server.url)


def test_failing_step_answers_a_json_request_with_an_openai_shaped_500(server: Any, engine: mstar.Engine,
                                                                        doomed: set[str]) -> None:
    doomed.add("doomed-json")
    r = _generate(server.url, "doomed-json", streaming=False)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "model_error" and err["type"] == "server_error" and INJECTED in err["message"]
    assert _wait_idle(engine)["kv_slots_used"] == 0
    _serves(server.url)


def test_failing_step_in_openai_chat_stream_sends_an_sse_error(server: Any, engine: mstar.Engine,
                                                               doomed: set[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Chat ids are minted by the engine: fail whichever request the chat route submits.
    seen: list[str] = []
    real_submit = engine.scheduler.submit

    def submit(req: Request) -> None:
        doomed.add(req.request_id)
        seen.append(req.request_id)
        real_submit(req)

    monkeypatch.setattr(engine.scheduler, "submit", submit)
    with _chat(server.url, stream=True) as resp:
        assert resp.status_code == 200
        events = [line[len(b"data: "):] for line in resp.iter_lines() if line.startswith(b"data: ")]
    docs = [json.loads(e) for e in events if e != b"[DONE]"]
    assert "error" in docs[-1], docs[-1]
    assert docs[-1]["error"]["code"] == "model_error" and INJECTED in docs[-1]["error"]["message"]
    assert any(d.get("choices") and d["choices"][0]["delta"].get("content") for d in docs[:-1])

    r = _chat(server.url, stream=False)
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_error"
    assert len(seen) == 2
    monkeypatch.undo()
    assert _wait_idle(engine)["kv_slots_used"] == 0
    r = _chat(server.url, stream=False)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_failing_step_before_any_output_is_still_an_error_line(server: Any, engine: mstar.Engine) -> None:
    def hook(req: Request) -> None:
        if req.request_id == "doomed-at-once":
            raise RuntimeError(INJECTED)

    engine.scheduler.fault_hook = hook
    try:
        with _generate(server.url, "doomed-at-once", stream=True) as resp:
            status = resp.status_code
            lines = _lines(resp) if status == 200 else []
            body = resp.text if status != 200 else ""
    finally:
        engine.scheduler.fault_hook = None
    if status == 200:
        assert [line["modality"] for line in lines] == ["error"]
        assert lines[0]["metadata"]["code"] == "model_error"
    else:
        assert status == 500 and json.loads(body)["error"]["code"] == "model_error"
    _serves(server.url)


# --------------------------------------------------------------------------- slow clients


def _raw_post(port: int, path: str, body: bytes, ctype: str, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


def _multipart(fields: dict[str, str]) -> tuple[bytes, str]:
    b = "reliabilityboundary"
    parts = "".join(f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items())
    return f"{parts}--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


@pytest.mark.slow
def test_slow_reader_does_not_block_other_clients(server: Any, engine: mstar.Engine) -> None:
    body, ctype = _multipart({"text": "flood", "output_modalities": "audio", "request_id": "slow-reader",
                              "model_kwargs": json.dumps({"max_output_tokens": 100000, "step_delay": 0.002})})
    sock = _raw_post(server.port, "/generate", body, ctype, rcvbuf=4096)
    try:
        time.sleep(1.0)  # never read: the server's socket buffers fill and its writes for this client stall
        assert engine.scheduler.is_inflight("slow-reader")
        for _ in range(5):
            t0 = time.monotonic()
            _serves(server.url)
            assert time.monotonic() - t0 < 3.0, "another client waited behind the slow reader"
        with _chat(server.url, stream=True) as resp:
            assert resp.status_code == 200 and b"[DONE]" in resp.content
    finally:
        requests.post(server.url + "/cancel/slow-reader", timeout=10)
        sock.close()
    assert _wait_idle(engine)["kv_slots_used"] == 0


def test_slow_reader_that_disconnects_is_cancelled(server: Any, engine: mstar.Engine) -> None:
    body, ctype = _multipart({"text": "flood", "output_modalities": "audio", "request_id": "slow-gone",
                              "model_kwargs": json.dumps({"max_output_tokens": 100000, "step_delay": 0.002})})
    sock = _raw_post(server.port, "/generate", body, ctype, rcvbuf=4096)
    time.sleep(0.5)
    assert engine.scheduler.is_inflight("slow-gone")
    sock.close()
    deadline = time.monotonic() + 10
    while engine.scheduler.is_inflight("slow-gone") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.scheduler.is_inflight("slow-gone"), "a stalled stream whose client left must be cancelled"


def _status_or_close(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """What the server sends (or b'' when it just closes) within ``within`` seconds, and when."""
    t0 = time.monotonic()
    sock.settimeout(within)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and data.startswith(b"HTTP/"):
                break
    except TimeoutError:
        pytest.fail(f"the server neither answered nor closed a stalled upload within {within} s")
    return data, time.monotonic() - t0


@pytest.mark.slow
def test_slow_body_is_cut_off_by_the_body_timeout(engine: mstar.Engine, tmp_path: Path) -> None:
    # The server must bound the time to receive a body (uvicorn has no such timeout): a client that sends
    # its headers and then trickles (or stalls) must not hold a connection and a worker forever.
    with serve(engine, tmp_path / "u", body_timeout=1.0) as srv:
        body, ctype = _multipart({"text": "x" * 1000})
        sock = socket.socket()
        sock.connect(("127.0.0.1", srv.port))
        try:
            sock.sendall((f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:100])
            t0 = time.monotonic()
            others_ok = 0
            while time.monotonic() - t0 < 0.5:  # meanwhile, others are served
                _serves(srv.url)
                others_ok += 1
            data, _ = _status_or_close(sock, within=5.0)
            waited = time.monotonic() - t0
        finally:
            sock.close()
        assert others_ok >= 1
        assert waited < 4.0
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b"body_timeout" in data or b"408" in data
        _serves(srv.url)


@pytest.mark.slow
def test_trickled_body_is_cut_off_by_the_same_deadline(engine: mstar.Engine, tmp_path: Path) -> None:
    # One byte every 0.2 s never lets a per-read idle timer fire: the deadline covers the whole body.
    with serve(engine, tmp_path / "u", body_timeout=1.0) as srv:
        body, ctype = _multipart({"text": "x" * 200})
        sock = socket.socket()
        sock.connect(("127.0.0.1", srv.port))
        sock.settimeout(0.2)
        t0 = time.monotonic()
        data = b""
        try:
            sock.sendall((f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n").encode())
            for byte in body:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                try:
                    data += sock.recv(4096)
                except TimeoutError:
                    continue
                if data or time.monotonic() - t0 > 5:
                    break
        finally:
            sock.close()
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert time.monotonic() - t0 < 3.0


# --------------------------------------------------------------------------- a model that is still loading


def test_loading_model_answers_503_until_ready_then_serves(tmp_path: Path) -> None:
    gate = threading.Event()

    def load() -> mstar.Engine:
        assert gate.wait(30)
        return mstar.Engine("fake", weights="tiny")

    app = create_app(load, model="fake", upload_dir=tmp_path)
    with ServerThread(app) as srv:
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200
        ready = requests.get(srv.url + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "loading" and ready.headers.get("Retry-After")
        t0 = time.monotonic()
        r = _generate(srv.url, streaming=False)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "not_ready" and "loading" in r.json()["error"]["message"]
        assert r.headers.get("Retry-After")
        chat = _chat(srv.url, stream=False)
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "not_ready"
        assert time.monotonic() - t0 < 5.0, "requests during loading are refused at once, not left hanging"
        gate.set()
        deadline = time.monotonic() + 20
        while requests.get(srv.url + "/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the model never became ready"
            time.sleep(0.05)
        _serves(srv.url)
        app.state["mstar"].holder.engine.close()


def test_failed_load_keeps_answering_503_with_the_reason(tmp_path: Path) -> None:
    def load() -> mstar.Engine:
        raise RuntimeError("checkpoint shard 3 is missing")

    with ServerThread(create_app(load, model="fake", upload_dir=tmp_path)) as srv:
        deadline = time.monotonic() + 10
        while (ready := requests.get(srv.url + "/ready", timeout=5)).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "shard 3" in ready.json()["error"]
        r = _generate(srv.url, streaming=False)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200


# --------------------------------------------------------------------------- a full queue


def test_full_queue_answers_429_with_retry_after_and_recovers(engine: mstar.Engine, tmp_path: Path) -> None:
    with serve(engine, tmp_path / "u", max_concurrent=1, max_queue=0) as srv:
        with _generate(srv.url, "queue-hog", stream=True, tokens=100000, delay=0.01) as busy:
            assert busy.status_code == 200
            r = _generate(srv.url, streaming=False)
            assert r.status_code == 429 and r.headers.get("Retry-After")
            assert r.json()["error"]["type"] == "rate_limit_error" and "busy" in r.json()["error"]["message"]
            requests.post(srv.url + "/cancel/queue-hog", timeout=10)
        _wait_idle(engine)
        deadline = time.monotonic() + 5
        while (r := _generate(srv.url, streaming=False, tokens=3, delay=0.0)).status_code == 429:
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.05)
        assert r.status_code == 200
