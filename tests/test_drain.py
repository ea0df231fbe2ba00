"""SIGTERM drains a real ``mstar-server`` process: it stops admitting, lets running requests finish
within the grace period, ends the rest with an error, removes leftover uploads and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from mstar.errors import DrainingError
from mstar.server import create_app
from mstar.server.drain import drain
from mstar.server.state import Admission
from tests.helpers.servers import ServerThread, free_port

if TYPE_CHECKING:
    from collections.abc import Callable

    from mstar.engine import Engine

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)

GRACE_S = 6.0
# Long enough that tiny Orpheus cannot finish it within the grace period on any machine we test on.
LONG = {"max_output_tokens": 1500}
SHORT = {"max_output_tokens": 28}


class ServerProcess:
    """``python -m mstar.server.cli`` serving tiny Orpheus on a free loopback port."""

    def __init__(self, upload_dir: Path, grace_s: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = upload_dir.parent / "server.log"
        cmd = [sys.executable, "-m", "mstar.server.cli", "--model", "orpheus", "--weights", "tiny",
               "--port", str(self.port), "--upload-dir", str(upload_dir), "--max-seq-len", "2048",
               "--shutdown-grace-s", str(grace_s), "--log-level", "info"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited early:\n{self.output()}"
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server never became ready:\n{self.output()}")

    def running(self) -> float:
        """The server's running-requests gauge, read from /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("mstar_server_requests_running{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("/metrics has no mstar_server_requests_running")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    upload_dir = tmp_path / "uploads"
    upload_dir.mkdir()
    proc = ServerProcess(upload_dir, GRACE_S)
    try:
        proc.wait_ready()
        yield proc, upload_dir
    finally:
        proc.kill()


def _generate(url: str, kwargs: dict[str, Any], *, streaming: bool, out: dict[str, Any]) -> None:
    """One /generate call on a thread: ``out`` gets the status and the NDJSON lines (or the JSON body)."""
    data = {"text": "a sentence to speak slowly", "output_modalities": "audio", "streaming": str(streaming).lower(),
            "model_kwargs": json.dumps(kwargs)}
    try:
        with httpx.Client(timeout=60) as client, client.stream("POST", url + "/generate", data=data) as resp:
            out["status"] = resp.status_code
            if streaming:
                out["lines"] = [json.loads(line) for line in resp.iter_lines() if line.strip()]
            else:
                out["body"] = json.loads(resp.read())
    except Exception as exc:  # recorded for the assertion message
        out["exception"] = repr(exc)


def _start(url: str, kwargs: dict[str, Any], *, streaming: bool) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=_generate, args=(url, kwargs), kwargs={"streaming": streaming, "out": out}, daemon=True)
    thread.start()
    return thread, out


def _wait_running(srv: ServerProcess, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while srv.running() < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests ever ran at once"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_drains_then_exits_zero(server: tuple[ServerProcess, Path]) -> None:
    srv, upload_dir = server
    long_streams = [_start(srv.url, LONG, streaming=True) for _ in range(2)]
    long_whole = _start(srv.url, LONG, streaming=False)
    _wait_running(srv, 3)
    short_whole = _start(srv.url, SHORT, streaming=False)
    _wait_running(srv, 4)
    # What requests cut off mid-upload would leave behind (a blob, or a blob's folder), and a file
    # that is not the server's, which stays.
    (upload_dir / (32 * "a" + ".wav")).write_bytes(b"RIFF")
    (upload_dir / (32 * "b")).mkdir()
    (upload_dir / (32 * "b") / "clip.wav").write_bytes(b"RIFF")
    (upload_dir / "notes.txt").write_text("the operator's")

    signalled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the signal handler runs between two bytecodes of the server's loop

    ready = httpx.get(srv.url + "/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["status"] == "draining" and ready.headers.get("Retry-After")
    refused = httpx.post(srv.url + "/generate", data={"text": "hi", "streaming": "false"}, timeout=5)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "draining" and int(refused.headers["Retry-After"]) >= 1

    assert srv.proc.wait(timeout=GRACE_S + 15) == 0, srv.output()
    took = time.monotonic() - signalled
    assert took < GRACE_S + 8, f"the drain took {took:.1f} s for a {GRACE_S} s grace period"

    for thread, _ in [*long_streams, long_whole, short_whole]:
        thread.join(10)
    # The short request finished within the grace period.
    assert short_whole[1].get("status") == 200, short_whole[1]
    assert short_whole[1]["body"]["finish_reason"] == "length"
    # The long ones could not: each ended with the draining error, in-band once streaming had begun.
    for _, out in long_streams:
        assert out.get("status") == 200, out
        last = out["lines"][-1]
        assert last["modality"] == "error" and last["metadata"]["code"] == "draining", last
        assert any(line["modality"] == "audio" for line in out["lines"][:-1])
    assert long_whole[1].get("status") == 503, long_whole[1]
    assert long_whole[1]["body"]["error"]["code"] == "draining"
    assert sorted(p.name for p in upload_dir.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_second_sigterm_ends_the_grace_period_at_once(tmp_path: Path) -> None:
    upload_dir = tmp_path / "uploads"
    upload_dir.mkdir()
    srv = ServerProcess(upload_dir, grace_s=120)
    try:
        srv.wait_ready()
        stream = _start(srv.url, LONG, streaming=True)
        _wait_running(srv, 1)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert httpx.get(srv.url + "/ready", timeout=5).json()["status"] == "draining"
        hurried = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=20) == 0, srv.output()
        assert time.monotonic() - hurried < 12
        stream[0].join(10)
        last = stream[1]["lines"][-1]
        assert last["modality"] == "error" and last["metadata"]["code"] == "draining", last
    finally:
        srv.kill()


def test_a_closed_admission_refuses_the_queue_and_newcomers_but_keeps_running_slots() -> None:
    async def scenario() -> None:
        admission = Admission(max_concurrent=1, max_queue=2)
        await admission.acquire()
        queued = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        assert admission.waiting == 1
        admission.close(lambda: DrainingError("draining", retry_after=1))
        with pytest.raises(DrainingError):
            await queued
        with pytest.raises(DrainingError):
            await admission.acquire()
        assert (admission.running, admission.waiting) == (1, 0)
        admission.release()
        assert admission.running == 0

    asyncio.run(scenario())


def test_drain_ends_a_running_stream_with_an_in_band_error_and_refuses_new_requests(
    shared_engine: Callable[[str], Engine], tmp_path: Path
) -> None:
    app = create_app(shared_engine("fake"), upload_dir=tmp_path)
    state = app.state["mstar"]
    fields = {"text": "x" * 200, "output_modalities": "text",
              "model_kwargs": json.dumps({"max_output_tokens": 200, "step_delay": 0.05})}
    with ServerThread(app) as srv, httpx.Client(timeout=30) as client:
        with client.stream("POST", srv.url + "/generate", data=fields) as resp:
            lines = resp.iter_lines()
            assert json.loads(next(lines))["modality"] == "text"  # running
            loop = srv.server.servers[0].get_loop()
            ended = asyncio.run_coroutine_threadsafe(drain(state, grace_s=0.1), loop).result(20)
            rest = [json.loads(line) for line in lines if line.strip()]
        assert ended == 1
        assert rest[-1]["modality"] == "error" and rest[-1]["metadata"]["code"] == "draining"
        assert client.get(srv.url + "/ready").json()["status"] == "draining"
        refused = client.post(srv.url + "/generate", data={"text": "late", "streaming": "false"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert refused.headers["Retry-After"] == "1"
        metrics = client.get(srv.url + "/metrics").text
    assert 'mstar_request_errors_total{code="draining",model="fake",route="/generate"} 2.0' in metrics
    assert state.admission.running == 0 and not state.inflight
