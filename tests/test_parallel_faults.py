"""Tensor-parallel failures never hang the scheduler: a worker killed mid-generation, or failing a
step, fails that step's requests with WorkerFailedError, the engine reports itself unhealthy (the
server's ``/ready`` answers 503 with the reason, model routes 503 ``worker_failed``), and closing
it leaves no worker process behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

import mstar
from mstar.errors import WorkerFailedError
from mstar.server import create_app
from tests.helpers.parallel_load import process_gone
from tests.helpers.servers import ServerThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _engine() -> mstar.Engine:
    return mstar.Engine("orpheus", weights="tiny", device="cpu", dtype="float32", tensor_parallel_size=2)


@dataclass
class Killed:
    """A TP 2 engine whose worker was killed while a request streamed, and what that request got."""

    engine: mstar.Engine
    pids: list[int]
    error: BaseException | None
    failed_after_s: float


@pytest.fixture(scope="module")
def killed() -> Iterator[Killed]:
    engine = _engine()
    try:
        pids = engine.runner.parallel.pids
        assert len(pids) == 1 and engine.health() is None
        events = engine.generate(text="a long sentence to speak for a while", max_output_tokens=280, stream=True)
        next(iter(events))  # the request is running
        os.kill(pids[0], signal.SIGKILL)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            for _ in events:
                pass
        except Exception as exc:  # the test asserts its type
            error = exc
        yield Killed(engine, pids, error, time.monotonic() - started)
    finally:
        engine.close()
    # Closing a failed engine leaves no worker process behind.
    assert all(process_gone(pid) for pid in pids)
    assert engine.health() == "the engine is closed"


def test_killed_worker_fails_the_running_request_and_marks_the_engine_unhealthy(killed: Killed) -> None:
    assert isinstance(killed.error, WorkerFailedError)
    assert killed.failed_after_s < 30
    assert "worker" in (killed.engine.health() or "")
    with pytest.raises(WorkerFailedError):  # later requests fail at once, typed
        killed.engine.generate(text="again", max_output_tokens=28)


def test_ready_answers_503_over_http_and_a_request_gets_worker_failed(killed: Killed) -> None:
    reason = killed.engine.health()
    assert reason is not None
    with ServerThread(create_app(killed.engine)) as server:
        ready = requests.get(server.url + "/ready", timeout=10)
        assert ready.status_code == 503 and ready.headers.get("Retry-After")
        assert ready.json() == {"status": "unhealthy", "model": "orpheus", "error": reason}
        form = {"text": (None, "hello"), "streaming": (None, "false"), "model_kwargs": (None, '{"max_output_tokens": 28}')}
        started = time.monotonic()
        answer = requests.post(server.url + "/generate", files=form, timeout=30)
        assert time.monotonic() - started < 10  # answered at once, not after a step timeout
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "worker_failed" and "worker" in error["message"]


def test_worker_failing_a_step_fails_its_requests_and_close_leaves_no_process() -> None:
    engine = _engine()
    try:
        pids = engine.runner.parallel.pids
        engine.generate(text="first", max_output_tokens=28)  # healthy
        engine.runner.parallel.inject_failure(1)
        with pytest.raises(WorkerFailedError, match="injected"):
            engine.generate(text="second", max_output_tokens=28)
        assert engine.health() is not None
    finally:
        engine.close()
    deadline = time.monotonic() + 10
    while not all(process_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(process_gone(pid) for pid in pids)
